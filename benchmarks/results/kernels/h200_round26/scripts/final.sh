# the final code on the H200: the kernel tests, then the 128K decode step (int8 scoring)
source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 330 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_pdl.py tests/test_kernels.py tests/test_kernels_hierarchy.py tests/test_graph_decode.py tests/test_kernels_gist_keys8.py tests/test_kernels_window_select.py tests/test_kernels_rows.py tests/test_kernels_select_rows.py tests/test_kernels_kv_place.py tests/test_kernels_recall_mask.py -k "not gist_memory" 2>&1 | tail -3) | tee $OUT/tests_h200_r26.txt
timeout 200 python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_r26_int8 2>&1 | grep -v "^$" | tail -6 | cut -c1-250
