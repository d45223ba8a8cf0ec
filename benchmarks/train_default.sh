#!/usr/bin/env bash
# Trains the default model's gist adapters on one GPU (the H200 run behind the bundled adapter):
# stage 1 (CPT) then stage 2 (SFT) for chunk 8, chunk 16 and the no-gist baseline, the three
# runs side by side on one GPU. Usage: benchmarks/train_default.sh DATA_DIR OUT_DIR
# DATA_DIR holds cpt/*.jsonl, nq/train.jsonl, hotpotqa/train.jsonl (the shared data layout).
set -euo pipefail
data=$1; out=$2
common="--batch-size 8 --lr 2e-4 --warmup 20 --lora-r 16 --lora-alpha 32 --seed 0 --log-every 10"
run() {  # name chunk
  python3 -m gsa_rag.cli train cpt --data "$data"/cpt/*.jsonl --output "$out/$1-cpt" --chunk-size "$2" $common \
    --steps "${CPT_STEPS:-300}" --block-tokens 1024 --tail-tokens 128 --max-minutes "${CPT_MINUTES:-3.5}"
  python3 -m gsa_rag.cli train sft --data "$data"/nq/train.jsonl "$data"/hotpotqa/train.jsonl --output "$out/$1-sft" \
    --init-adapter "$out/$1-cpt" $common --steps "${SFT_STEPS:-300}" --max-prompt-tokens 2048 \
    --max-minutes "${SFT_MINUTES:-3.5}"
}
run gsa8 8 > "$out/gsa8.log" 2>&1 &
run gsa16 16 > "$out/gsa16.log" 2>&1 &
run full 0 > "$out/full.log" 2>&1 &
wait
