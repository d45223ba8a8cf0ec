source .device/run/setup.sh
cd /tmp && cp $OLDPWD/.device/s20/pdl_parts.py .
timeout 100 python3 pdl_parts.py 8 2>&1 | tail -4
timeout 100 python3 pdl_parts.py 1 2>&1 | tail -4
cd $OLDPWD
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 200 python -m pytest -q -x -o addopts="" -p no:cacheprovider tests/test_pdl.py tests/test_kernels.py -k "(sparse_decode or combine or scores or loop or fused or key_list) and not gist_memory" 2>&1 | tail -2) | tee $OUT/tests_h200_r23_policy.txt
timeout 200 python3 benchmarks/kernels.py --no-flex --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_r23_int8 2>&1 | grep -v "^$" | tail -7
