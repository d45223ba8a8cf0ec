source .device/run/setup.sh
python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_step_r22_expand 2>&1 | grep -E "^llama3-8b" 
