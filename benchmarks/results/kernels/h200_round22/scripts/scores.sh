bash .device/run/setup.sh
export PYTHONPATH=/root/src
python3 benchmarks/scores_sweep.py --quick --out $OUT/scores_sweep_quick.json 2>&1 | grep -v "^$" | tail -8
for i in 1; do
python3 benchmarks/kernels.py --no-flex --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_int8_persistent_$i 2>&1 | grep -v "^$" | tail -7
NAME=decode_int8_steps_$i python3 - <<'PY' 2>&1 | grep -v "^$" | tail -7
import os, sys, runpy
sys.argv = ["kernels.py", "--no-flex", "--contexts", "131072", "32768", "--shapes", "llama3-8b", "--batches", "1", "8",
            "--score-dtype", "int8", "--out", "/root/out", "--name", os.environ["NAME"]]
from gsa_rag.kernels import gist_select
gist_select.INT8_PERSISTENT = False
runpy.run_path("benchmarks/kernels.py", run_name="__main__")
PY
done
