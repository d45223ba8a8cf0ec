cp .device/smol.part06 /root/stage/ && cat /root/stage/smol.part0* > /root/smol.gguf
sha256sum /root/smol.gguf | cut -c1-16
pip install -q --no-index --no-deps --target /root/pylib .device/whl/*.whl 2>&1 | tail -1
source .device/run/setup.sh
export PYTHONPATH=/root/src:/root/pylib GSA_RAG_DATA=$PWD/.device/data GSA_RAG_DEFAULT_MODEL=/root/smol.gguf GSA_RAG_CACHE=/root/gcache
cd /root/src
for mode in graphs eager; do
  flag=""; [ $mode = eager ] && flag="--no-cuda-graphs"
  timeout 250 python -m gsa_rag.cli eval nq --limit 1000 --batch-size 32 --max-new-tokens 16 --device cuda $flag --out $OUT/nq1000_bundled8_$mode.json 2>&1 | grep -E "Error|error|Warning" | head -3
  python -c "import json; s=json.load(open('$OUT/nq1000_bundled8_$mode.json'))['summary']; print('$mode', s['n'], s['subspan_em'], s['subspan_em_ci95'], s['f1'], s['attended_keys'], s['seconds'])"
done
python - <<'PY'
import json, os
out = os.environ["OUT"]
a = json.load(open(f"{out}/nq1000_bundled8_graphs.json"))["examples"]
b = json.load(open(f"{out}/nq1000_bundled8_eager.json"))["examples"]
same = sum(x["prediction"] == y["prediction"] for x, y in zip(a, b)); em = sum(x["subspan_em"] == y["subspan_em"] for x, y in zip(a, b))
print("identical answers", same, "of", len(a), "same em", em)
PY
