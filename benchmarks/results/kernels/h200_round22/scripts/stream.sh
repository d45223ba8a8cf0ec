source .device/run/setup.sh
REPO=$PWD
cd /tmp
for mode in stream regs stream regs; do
MODE=$mode REPO=$REPO python3 - <<'PY' 2>&1 | grep -E "^llama3-8b|^stream|^regs"
import os, sys, runpy
mode = os.environ["MODE"]
sys.argv = ["kernels.py", "--no-flex", "--contexts", "131072", "--shapes", "llama3-8b", "--batches", "8",
            "--score-dtype", "int8", "--out", "/root/out", "--name", f"decode_b8_{mode}_{os.getpid()}"]
from gsa_rag.kernels import gist_select
gist_select.STREAM_ROWS = mode == "stream"
print(mode)
runpy.run_path(os.environ["REPO"] + "/benchmarks/kernels.py", run_name="__main__")
PY
done
