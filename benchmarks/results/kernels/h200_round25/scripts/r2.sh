source .device/run/setup.sh
python3 .device/s25/cmp.py 2>&1 | grep -v Warn | tail -3
timeout 330 python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 \
  --ab sparse_decode.BALANCED_SPLITS=True,False --rounds 2 --out $OUT --name decode_r25_ab_128k_noreturn 2>&1 | grep -vE "^\s*$" | tail -10 | cut -c1-330
