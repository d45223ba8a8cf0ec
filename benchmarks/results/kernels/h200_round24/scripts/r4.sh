source .device/run/setup.sh
REPO=$PWD
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 200 python -m pytest -q -x -o addopts="" -p no:cacheprovider tests/test_kernels_window_select.py tests/test_pdl.py tests/test_kernels.py -k "window or pdl or key_list or fused or hard_rows or streamed or tied" 2>&1 | tail -2) | tee $OUT/tests_h200_r24_final.txt
cd /tmp
for mode in window search window search; do
MODE=$mode REPO=$REPO timeout 100 python3 - <<'PY' 2>&1 | grep -E "^llama3-8b|^window|^search|Error" | cut -c1-300
import os, sys, runpy
mode = os.environ["MODE"]
sys.argv = ["kernels.py", "--no-flex", "--contexts", "262144", "--shapes", "llama3-8b", "--batches", "1",
            "--score-dtype", "int8", "--out", "/root/out", "--name", f"decode_256k_b1_{mode}_{os.getpid()}"]
from gsa_rag.kernels import gist_select
gist_select.WINDOW_SELECT = mode == "window"
print(mode)
runpy.run_path(os.environ["REPO"] + "/benchmarks/kernels.py", run_name="__main__")
PY
done
