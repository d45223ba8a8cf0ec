source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 120 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernels.py -k "sparse_decode or split_width" 2>&1 | tail -3) | tee $OUT/tests.txt
