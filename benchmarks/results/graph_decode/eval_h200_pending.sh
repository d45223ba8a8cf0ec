mkdir -p /root/stage && cp .device/smol.part06 /root/stage/ && cat /root/stage/smol.part0* > /root/smol.gguf
sha256sum /root/smol.gguf | cut -c1-16
pip install -q --no-index --no-deps --target /root/pylib .device/whl/*.whl 2>&1 | grep -v WARN | tail -1
REPO=$PWD
source .device/run/setup.sh
timeout 100 python benchmarks/decode_latency.py --contexts 32 --steps 32 --warmup 32 --batch 8 --out $OUT --name s135_b8_pending 2>&1 | grep -E "^L=|wrote"
timeout 100 python benchmarks/decode_latency.py --meta 4 --contexts 32 --steps 32 --warmup 32 --batch 8 --out $OUT --name s135_b8_hgsa32_pending 2>&1 | grep -E "^L=|wrote"
export PYTHONPATH=/root/src:/root/pylib GSA_RAG_DATA=$REPO/.device/data GSA_RAG_DEFAULT_MODEL=/root/smol.gguf GSA_RAG_CACHE=/root/gcache
cd /root/src
for mode in eager graphs; do
  flag=""; [ $mode = eager ] && flag="--no-cuda-graphs"
  timeout 150 python -m gsa_rag.cli eval nq --limit 500 --batch-size 32 --max-new-tokens 16 --device cuda $flag --out $OUT/nq500_pending_$mode.json 2>&1 | grep -E "Error|error" | head -3
  python -c "import json; s=json.load(open('$OUT/nq500_pending_$mode.json'))['summary']; print('$mode', s['n'], s['subspan_em'], s['f1'], s['seconds'])"
done
python - <<'PY'
import json, os
out = os.environ["OUT"]
a = json.load(open(f"{out}/nq500_pending_graphs.json"))["examples"]
b = json.load(open(f"{out}/nq500_pending_eager.json"))["examples"]
same = sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)); em = sum(x["subspan_em"] == y["subspan_em"] for x, y in zip(a, b))
print("identical answers", same, "of", len(a), "same em", em)
PY
