#!/usr/bin/env bash
# Round 2 of the default model's training on one GPU: does a selection loss fix the 8x adapter's
# below-chance gold-chunk recall, and how does H-GSA train? Same data, steps and settings as
# benchmarks/train_default.sh (round 1), all runs side by side on one GPU.
#
#   stage 1 (CPT): chunk 8; H-GSA (8,4) = 32x; H-GSA (4,4) = 16x
#   stage 2 (SFT) from the chunk-8 CPT: answer loss only (the control), + selection loss 0.3,
#     + selection loss 1.0 (both against every gold chunk: target `all`, as run in round 2), the
#     KV-reuse layout (--reuse); from each H-GSA CPT: its SFT.
#   round 3 adds selection loss 1.0 with target `any` (the gold passages' total probability) on
#     the prompt's last row (gsa8-any1) and on every question row (gsa8-any1-tail); next, the same
#     loss at every level of H-GSA 32x (chunks and sections), on the last row (hgsa32-any1) and on
#     every question row (hgsa32-any1-tail).
#   round 6: H-GSA 32x continued from the bundled 8x adapter, whose level-0 gists are trained
#     already (progressive compression): its SFT straight away (hgsa32-from8-sft), and a 32x CPT
#     first, then the SFT (hgsa32-from8-cpt -> hgsa32-from8); the control gives the bundled 8x the
#     same extra CPT + SFT at 8x (gsa8-cont-cpt -> gsa8-cont).
#
# Usage: benchmarks/train_round2.sh DATA_DIR OUT_DIR [RUN...]   (DATA_DIR: cpt/, nq/, hotpotqa/ as in
# ../shared/data; RUN: names below, e.g. gsa8 gsa8-sel1 to do only those; default every run)
# A run whose adapter exists is skipped, so a second call redoes only what failed (six SFTs side by
# side can run an H200 out of memory: the dense-mask runs take ~50 GB each).
set -euo pipefail
data=$1; out=$2; shift 2; only=" $* "
mkdir -p "$out"
done_() { [ -f "$out/$1/gsa_adapter.json" ]; }
skip() { [ "$only" != "  " ] && [[ "$only" != *" $1 "* ]]; }
common="--batch-size 8 --lr 2e-4 --warmup 20 --lora-r 16 --lora-alpha 32 --seed 0 --log-every 10"
cpt() {  # name chunk-args...
  local name=$1; shift
  skip "$name" || done_ "$name-cpt" && return
  python3 -m gsa_rag.cli train cpt --data "$data"/cpt/*.jsonl --output "$out/$name-cpt" "$@" $common \
    --steps "${CPT_STEPS:-300}" --block-tokens 1024 --tail-tokens 128 --max-minutes "${CPT_MINUTES:-3.5}" \
    > "$out/$name-cpt.log" 2>&1
}
sft() {  # name init extra-args...   (init: a CPT run's name, or "bundled": the bundled 8x adapter)
  local name=$1 init=$2; shift 2
  skip "$name" || done_ "$name" && return
  rm -rf "${out:?}/$name"  # a run that died leaves a log and no adapter
  local from="$out/$init-cpt"; [ "$init" = bundled ] && from=default
  python3 -m gsa_rag.cli train sft --data "$data"/nq/train.jsonl "$data"/hotpotqa/train.jsonl --output "$out/$name" \
    --init-adapter "$from" "$@" $common --steps "${SFT_STEPS:-300}" --max-prompt-tokens 2048 \
    --max-minutes "${SFT_MINUTES:-3.5}" > "$out/$name.log" 2>&1
}
cpt gsa8 --chunk 8 &
cpt hgsa32 --chunk 8 4 &
cpt hgsa16 --chunk 4 4 &
cpt hgsa32-from8 --chunk 8 4 --init-adapter default &
cpt gsa8-cont --chunk 8 --init-adapter default &
wait
sft gsa8-sft gsa8 &
sft gsa8-sel0.3 gsa8 --selection-loss 0.3 --selection-target all &
sft gsa8-sel1 gsa8 --selection-loss 1.0 --selection-target all &
sft gsa8-any1 gsa8 --selection-loss 1.0 --selection-target any &
sft gsa8-any1-tail gsa8 --selection-loss 1.0 --selection-target any --selection-rows tail &
sft gsa8-reuse gsa8 --reuse &
sft hgsa32-sft hgsa32 &
sft hgsa32-any1 hgsa32 --selection-loss 1.0 --selection-target any &
sft hgsa32-any1-tail hgsa32 --selection-loss 1.0 --selection-target any --selection-rows tail &
sft hgsa16-sft hgsa16 &
sft hgsa32-from8 hgsa32-from8 &
sft hgsa32-from8-sft bundled --chunk 8 4 &  # no CPT of its own
sft gsa8-cont gsa8-cont &
wait
