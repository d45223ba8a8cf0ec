cp .device/smol.part06 /root/stage/ && cat /root/stage/smol.part0* > /root/smol.gguf
pip install -q --no-index --no-deps --target /root/pylib .device/whl/*.whl 2>&1 | grep -v WARN | tail -1
REPO=$PWD
source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_graph_decode.py tests/test_kernels.py -k "graph or pinned or refusal or sparse_decode or split_width or engine_decode or key_list or closed_early or pinning or full_attention or dense_path" 2>&1 | tail -3) | tee $OUT/tests.txt
export PYTHONPATH=/root/src:/root/pylib GSA_RAG_DATA=$REPO/.device/data GSA_RAG_DEFAULT_MODEL=/root/smol.gguf GSA_RAG_CACHE=/root/gcache
cd /root/src
for mode in eager graphs; do
  flag=""; [ $mode = eager ] && flag="--no-cuda-graphs"
  timeout 120 python -m gsa_rag.cli eval nq --limit 500 --batch-size 32 --max-new-tokens 16 --device cuda $flag --out $OUT/nq500_split_$mode.json 2>&1 | grep -E "Error|error" | head -3
  python -c "import json; s=json.load(open('$OUT/nq500_split_$mode.json'))['summary']; print('$mode', s['n'], s['subspan_em'], s['f1'], s['seconds'])"
done
python - <<'PY'
import json, os
out = os.environ["OUT"]
a = json.load(open(f"{out}/nq500_split_graphs.json"))["examples"]
b = json.load(open(f"{out}/nq500_split_eager.json"))["examples"]
print("identical answers", sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)), "of", len(a))
PY
