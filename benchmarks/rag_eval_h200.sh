#!/usr/bin/env bash
# The GPU run of benchmarks/rag_eval.py behind the README's benchmark tables: every method on
# NQ, HotpotQA, TriviaQA and MuSiQue, one process per (set, method group) side by side on one
# GPU (the 135M model leaves an H200 launch-bound, so parallel processes add throughput).
# Each group runs with the adapter its rows need: the classic baselines and Quest on the
# untrained model, gist rows with the gist adapter of their chunk size, `full` once more with
# the no-gist adapter trained the same way. Results resume: run the script again until done.
#
# Usage: GSA_RAG_DATA=DIR ADAPTER_FULL=DIR ADAPTER_GSA16=DIR benchmarks/rag_eval_h200.sh [SECONDS]
# (ADAPTER_GSA8 defaults to the bundled 8x adapter; SECONDS bounds every process, default 540.)
set -uo pipefail
seconds=${1:-540}
out=${RAG_EVAL_OUT:-benchmarks/results/rag_eval/h200}
mkdir -p "$out/logs"
run() {  # set group adapter methods
  local batch=64
  [ "$1" = musique ] && batch=8  # ~6K-token prompts
  timeout "$seconds" python3 benchmarks/rag_eval.py --data "$1" --adapter "$3" --methods "$4" --batch-size "$batch" \
    --device cuda --max-new-tokens 16 --no-plots --out "$out/$1-$2.json" > "$out/logs/$1-$2.log" 2>&1 &
}
for set in nq hotpotqa triviaqa musique; do
  run "$set" baselines none closed-book,full,vector:k=1,vector:k=3,vector:k=5
  run "$set" open-quest none open,quest,quest:chunk=16
  run "$set" gsa8 "${ADAPTER_GSA8:-default}" gist-only,gsa,gsa:policy=adaptive
  run "$set" gsa16 "$ADAPTER_GSA16" gist-only:chunk=16,gsa:chunk=16,gsa:chunk=16:policy=adaptive
  run "$set" full-sft "$ADAPTER_FULL" full
done
wait
grep -h -E "Error|error:" "$out"/logs/*.log | sort | uniq -c | head -20
ls -la "$out"
