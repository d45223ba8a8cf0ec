source .device/run/setup.sh
REPO=$PWD
cd /tmp
for mode in pdl plain pdl plain; do
MODE=$mode REPO=$REPO timeout 100 python3 - <<'PY' 2>&1 | grep -E "^llama3-8b B|^pdl|^plain|Error" | cut -c1-260
import os, sys, runpy
mode = os.environ["MODE"]
sys.argv = ["kernels.py", "--no-flex", "--contexts", "262144", "--shapes", "llama3-8b", "--batches", "1",
            "--score-dtype", "int8", "--out", "/root/out", "--name", f"decode_256k_b1_window_{mode}_{os.getpid()}"]
from gsa_rag.kernels import window_select
if mode == "plain":  # the window select kernel alone launched plainly
    launch = window_select.pdl_launch
    window_select.pdl_launch = lambda device, allow=True: launch(device, allow=False)
print(mode)
runpy.run_path(os.environ["REPO"] + "/benchmarks/kernels.py", run_name="__main__")
PY
done
