source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 280 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_pdl.py tests/test_kernels.py tests/test_kernels_hierarchy.py tests/test_graph_decode.py tests/test_kernels_gist_keys8.py -k "not gist_memory" 2>&1 | tail -2) | tee $OUT/tests_h200_r23_review.txt
timeout 150 python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --out $OUT --name decode_r23_int8_review 2>&1 | grep -v "^$" | tail -4 | cut -c1-220
