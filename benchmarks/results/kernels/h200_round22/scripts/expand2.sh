source .device/run/setup.sh
REPO=$PWD
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 150 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernels.py -k "expand or key_list or fused or contiguous or index_list" 2>&1 | tail -2) | tee $OUT/tests_h200_r22_expand.txt
cd $REPO && python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_step_r22_expand_2 2>&1 | grep -E "^llama3-8b  "
