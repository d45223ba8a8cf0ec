#!/usr/bin/env bash
# Calibration of benchmarks/rag_eval.py against plain-script reference numbers for the untrained
# model (closed-book, all passages, vector top-1/3/5 on NQ dev first 500 and HotpotQA dev 300;
# ../shared/docs/GPU.md). 64 new tokens: the untrained model answers in sentences, and 16 tokens
# (benchmarks/rag_eval_h200.sh) cut ~90% of its answers short. One process per (set, method).
# Usage: GSA_RAG_DATA=DIR benchmarks/rag_eval_calibrate.sh [SECONDS]
set -uo pipefail
seconds=${1:-300}
out=${RAG_EVAL_OUT:-benchmarks/results/rag_eval/h200/calibration}
mkdir -p "$out/logs"
for set in nq hotpotqa; do
  limit=500; [ "$set" = hotpotqa ] && limit=300
  for method in closed-book full vector:k=1 vector:k=3 vector:k=5; do
    name="$set-${method//[:=]/-}"
    timeout "$seconds" python3 benchmarks/rag_eval.py --data "$set" --limit "$limit" --adapter none --methods "$method" \
      --batch-size 64 --device cuda --max-new-tokens 64 --no-plots --out "$out/$name.json" > "$out/logs/$name.log" 2>&1 &
  done
done
wait
grep -h -E "Error|error:" "$out"/logs/*.log | sort | uniq -c | head -20
