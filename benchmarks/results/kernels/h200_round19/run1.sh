REPO=$PWD
source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 200 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_graph_decode.py tests/test_kernels_hierarchy.py 2>&1 | tail -4) | tee $OUT/tests.txt
timeout 120 python benchmarks/decode_latency.py --meta 4 --contexts 32 --steps 32 --warmup 32 --out $OUT --name s135_b1_hgsa32 2>&1 | grep -E "^L=|wrote|Error"
timeout 120 python benchmarks/decode_latency.py --meta 4 --contexts 32 --steps 32 --warmup 32 --batch 8 --out $OUT --name s135_b8_hgsa32 2>&1 | grep -E "^L=|wrote|Error"
timeout 150 python benchmarks/decode_latency.py --meta 4 --arch llama3-8b --contexts 32 --steps 16 --warmup 16 --out $OUT --name l8b_b1_hgsa32 2>&1 | grep -E "^L=|wrote|Error"
