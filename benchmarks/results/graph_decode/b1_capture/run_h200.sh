mkdir -p /root/stage && cp .device/smol12.part07 /root/stage/ && cat /root/stage/smol12.part0* > /root/smol.gguf && sha256sum /root/smol.gguf | cut -c1-16
pip install -q --no-index --no-deps --target /root/pylib .device/whl/*.whl 2>&1 | grep -v WARN | tail -1
REPO=$PWD
source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 120 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_graph_decode.py 2>&1 | tail -2) | tee $OUT/tests.txt
export PYTHONPATH=/root/src:/root/pylib GSA_RAG_DATA=$REPO/.device/d40 GSA_RAG_DEFAULT_MODEL=/root/smol.gguf GSA_RAG_CACHE=/root/gcache
timeout 200 python .device/s16/prof_b1.py > $OUT/prof_b1.txt 2>&1; grep -E "per question|same answers|Error" $OUT/prof_b1.txt; grep -v "^$" $OUT/prof_b1.txt | grep -A40 "Ordered by" | cut -c1-180 | head -40
