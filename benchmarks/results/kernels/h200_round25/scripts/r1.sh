source .device/run/setup.sh
REPO=$PWD
cp -r tests pyproject.toml /root/src/
(cd /root/src && timeout 230 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_kernels.py tests/test_pdl.py tests/test_graph_decode.py -k "sparse_decode or balanced or split or key_list or pinned or pdl or compiles" 2>&1 | tail -4) | tee $OUT/tests_h200_r25_a.txt
timeout 330 python3 benchmarks/kernels.py --no-flex --contexts 131072 --shapes llama3-8b --batches 1 8 --score-dtype int8 \
  --ab sparse_decode.BALANCED_SPLITS=True,False --rounds 2 --out $OUT --name decode_r25_ab_128k 2>&1 | grep -vE "^\s*$" | tail -22 | cut -c1-330
