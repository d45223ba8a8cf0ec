source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 220 python -m pytest -q -x -o addopts="" -p no:cacheprovider tests/test_kernels_window_select.py tests/test_pdl.py tests/test_kernels.py -k "not gist_memory" 2>&1 | tail -3) | tee $OUT/tests_h200_r24_a.txt
timeout 240 python3 benchmarks/select_kernel.py --scores qk --out $OUT 2>&1 | tail -9 | cut -c1-600
