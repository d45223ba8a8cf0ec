bash .device/run/setup.sh
export PYTHONPATH=/root/src
python3 benchmarks/scores_sweep.py --quick --out $OUT/scores_sweep_quick3.json 2>&1 | grep -v "^$" | tail -4
python3 -c "
import json; r = json.load(open('$OUT/scores_sweep_quick3.json'))
for row in r['rows']:
    print(row['context'], row['batch'], {k: round(v, 1) for k, v in row['us'].items() if k.startswith('cache')})"
python3 benchmarks/kernels.py --no-flex --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_step_r22_int8 2>&1 | grep -v "^$" | tail -6
python3 benchmarks/kernels.py --no-flex --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --out $OUT --name decode_step_r22_cache 2>&1 | grep -v "^$" | tail -6
