source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 300 python -m pytest -q -x -o addopts="" -p no:cacheprovider tests/test_pdl.py tests/test_kernels.py tests/test_kernels_hierarchy.py tests/test_graph_decode.py -k "not gist_memory" 2>&1 | tail -4) | tee $OUT/tests_h200_r23_pdl.txt
timeout 240 python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_r23_pdl_int8 2>&1 | grep -v "^$" | tail -5
timeout 150 python3 benchmarks/kernels.py --no-flex --meta 4 --contexts 131072 --shapes llama3-8b --batches 1 8 --out $OUT --name decode_r23_pdl_hgsa32 2>&1 | grep -v "^$" | tail -5
