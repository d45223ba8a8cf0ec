source .device/run/setup.sh
REPO=$PWD
cd /tmp
for mode in ${@:-window search}; do  # r8.sh ran it as a copy with "window" alone
MODE=$mode REPO=$REPO timeout 100 python3 - <<'PY' 2>&1 | grep -E "^llama3-8b|^window|^search|Error" | cut -c1-300
import os, sys, runpy
mode = os.environ["MODE"]
sys.argv = ["kernels.py", "--no-flex", "--contexts", "524288", "--shapes", "llama3-8b", "--batches", "1",
            "--score-dtype", "int8", "--out", "/root/out", "--name", f"decode_512k_b1_{mode}_{os.getpid()}"]
from gsa_rag.kernels import gist_select
gist_select.WINDOW_SELECT = mode == "window"
print(mode)
runpy.run_path(os.environ["REPO"] + "/benchmarks/kernels.py", run_name="__main__")
PY
done
