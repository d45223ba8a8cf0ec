source .device/run/setup.sh
for pdl in 1 0 1 0; do
  GSA_RAG_PDL=$pdl timeout 130 python3 benchmarks/decode_latency.py --contexts 32 --batch 1 --out $OUT --name decode_latency_r25_pdl${pdl}_$RANDOM 2>&1 | grep -iE "tok|graph|error" | tail -4 | cut -c1-400
done
