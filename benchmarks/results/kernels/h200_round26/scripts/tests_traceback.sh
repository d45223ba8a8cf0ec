# the r5 run again without test_kernels_hierarchy, full traceback of any failure
source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
cd /root/src
timeout 250 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_graph_decode.py tests/test_kernels_gist_keys8.py tests/test_kernels_window_select.py tests/test_kernels_rows.py tests/test_kernels_select_rows.py tests/test_kernels_kv_place.py -k "not gist_memory" --tb=long 2>&1 | grep -v "^\.\.\.\|Warning\|warnings" | tail -60
