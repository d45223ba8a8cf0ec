source .device/run/setup.sh
REPO=$PWD
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 150 python -m pytest -q -x -o addopts="" -p no:cacheprovider tests/test_kernels_window_select.py tests/test_pdl.py 2>&1 | tail -2) | tee $OUT/tests_h200_r24_b.txt
cd /tmp && REPO=$REPO timeout 300 python3 $REPO/.device/s21/wsweep.py $OUT/window_sweep.json 2>&1 | tail -6
