source .device/run/setup.sh
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 200 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernels.py tests/test_pdl.py tests/test_graph_decode.py -k "sparse_decode or splits or split_width or key_list or pinned or compiles" 2>&1 | tail -3) | tee $OUT/tests_h200_r25_bylength.txt
for ov in 0 0.9; do
timeout 200 python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 --group-overlap $ov \
  --ab sparse_decode.SPLIT_BY_LENGTH=True,False --out $OUT --name decode_r25_bylength_overlap$ov 2>&1 | grep -E "^ *sparse_decode|^ +ab" | tail -4 | cut -c1-300
done
