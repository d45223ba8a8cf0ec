bash .device/run/setup.sh
export PYTHONPATH=/root/src
REPO=$PWD
python3 benchmarks/scores_sweep.py --quick --out $OUT/scores_sweep_quick2.json 2>&1 | grep -v "^$" | tail -4
python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_int8_persistent_a 2>&1 | grep -v "^$" | tail -4
cd /tmp && NAME=decode_int8_steps_a REPO=$REPO python3 - <<'PY' 2>&1 | grep -v "^$" | tail -4
import os, sys, runpy
sys.argv = ["kernels.py", "--no-flex", "--contexts", "131072", "--shapes", "llama3-8b", "--batches", "1", "8",
            "--score-dtype", "int8", "--out", "/root/out", "--name", os.environ["NAME"]]
from gsa_rag.kernels import gist_select
gist_select.INT8_PERSISTENT = False
runpy.run_path(os.environ["REPO"] + "/benchmarks/kernels.py", run_name="__main__")
PY
cd $REPO && python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_int8_persistent_b 2>&1 | grep -v "^$" | tail -4
