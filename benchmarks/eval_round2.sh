#!/usr/bin/env bash
# Evaluates the adapters of benchmarks/train_round2.sh with benchmarks/rag_eval.py on one GPU:
# NQ dev and HotpotQA dev (first NQ_LIMIT / HOTPOT_LIMIT questions, default 500 / 300), greedy,
# 16 new tokens, one process per (set, adapter) side by side, each bounded by SECONDS.
# Usage: GSA_RAG_DATA=DIR benchmarks/eval_round2.sh RUNS_DIR OUT_DIR SECONDS RUN...
set -uo pipefail
runs=$1; out=$2; seconds=$3; shift 3
mkdir -p "$out/logs"
methods() {
  case $1 in
    gsa8-reuse) echo gsa:reuse=1 ;;
    hgsa32-sft|hgsa32-any1|hgsa32-any1-tail) echo gsa:chunk=8:meta=4 ;;
    hgsa16-sft) echo gsa:chunk=4:meta=4 ;;
    *) echo gsa ;;
  esac
}
for name in "$@"; do
  [ -f "$runs/$name/gsa_adapter.json" ] || { echo "no adapter $runs/$name: skipped"; continue; }
  batch=32; [ "$name" = gsa8-reuse ] && batch=1  # the memory route answers one question at a time
  for set in nq hotpotqa; do
    limit=${NQ_LIMIT:-500}; [ "$set" = hotpotqa ] && limit=${HOTPOT_LIMIT:-300}
    timeout "$seconds" python3 benchmarks/rag_eval.py --data "$set" --limit "$limit" --adapter "$runs/$name" \
      --methods "$(methods "$name")" --batch-size "$batch" --device cuda --max-new-tokens 16 --no-plots \
      --out "$out/$set-$name.json" > "$out/logs/$set-$name.log" 2>&1 &
  done
done
wait
