source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 280 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_pdl.py tests/test_kernels.py tests/test_kernels_hierarchy.py tests/test_graph_decode.py -k "not gist_memory" 2>&1 | tail -2) | tee $OUT/tests_h200_r23_final.txt
timeout 150 python3 benchmarks/kernels.py --no-flex --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --out $OUT --name decode_r23_cache 2>&1 | grep -v "^$" | tail -7 | cut -c1-200
timeout 120 python3 benchmarks/kernels.py --no-flex --meta 4 --contexts 131072 32768 --shapes llama3-8b --batches 1 8 --out $OUT --name decode_r23_hgsa32 2>&1 | grep -v "^$" | tail -7 | cut -c1-200
