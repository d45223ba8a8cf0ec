mkdir -p /root/stage && cp .device/smol.part06 /root/stage/ && cat /root/stage/smol.part0* > /root/smol.gguf
sha256sum /root/smol.gguf | cut -c1-16
pip install -q --no-index --no-deps --target /root/pylib .device/whl/*.whl 2>&1 | grep -v WARN | tail -1
REPO=$PWD
source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_graph_decode.py 2>&1 | tail -2) | tee $OUT/tests.txt
export PYTHONPATH=/root/src:/root/pylib GSA_RAG_DATA=$REPO/.device/data GSA_RAG_DEFAULT_MODEL=/root/smol.gguf GSA_RAG_CACHE=/root/gcache
cd /root/src
run() {  # name flag limit batch
  timeout 200 python -m gsa_rag.cli eval nq --limit $3 --batch-size $4 --max-new-tokens 16 --device cuda $2 --out $OUT/$1.json 2>&1 | grep -E "Error|Traceback" | head -3
  python -c "import json; s=json.load(open('$OUT/$1.json'))['summary']; print('$1', s['n'], s['subspan_em'], s['f1'], s['seconds'])"
}
run nq500_grown_eager --no-cuda-graphs 500 32
run nq500_grown_graphs "" 500 32
run nq500_grown_eager2 --no-cuda-graphs 500 32
run nq100_b1_graphs "" 100 1
run nq100_b1_eager --no-cuda-graphs 100 1
python - <<'PY'
import json, os
out = os.environ["OUT"]
for a, b in (("nq500_grown_graphs", "nq500_grown_eager"), ("nq500_grown_eager2", "nq500_grown_eager"), ("nq100_b1_graphs", "nq100_b1_eager")):
    x = json.load(open(f"{out}/{a}.json"))["examples"]; y = json.load(open(f"{out}/{b}.json"))["examples"]
    print(a, "vs", b, "identical answers", sum(p["prediction"] == q["prediction"] for p, q in zip(x, y)), "of", len(x),
          "same em", sum(p["subspan_em"] == q["subspan_em"] for p, q in zip(x, y)))
PY
