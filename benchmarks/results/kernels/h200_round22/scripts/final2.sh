source .device/run/setup.sh
REPO=$PWD
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 300 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernels_gist_keys8.py tests/test_kernels.py -k "scores or loop or int8 or fused or key_list or sparse_decode or select" -x 2>&1 | tail -4) | tee $OUT/tests_h200_r22.txt
cd $REPO
python3 benchmarks/kernels.py --no-flex --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_step_r22_int8_final 2>&1 | grep -v "^$" | tail -6
