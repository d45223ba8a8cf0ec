source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 400 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernels_gist_keys8.py tests/test_kernels.py -k "(scores or loop or int8 or fused or key_list or sparse_decode or select) and not gist_memory" 2>&1 | tail -4) | tee $OUT/tests_h200_r22.txt
