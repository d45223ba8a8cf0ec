bash .device/run/setup.sh
export PYTHONPATH=/root/src TRITON_CACHE_DIR=/tmp/tc
python3 -c "import triton; print('triton', triton.__version__)"
python3 benchmarks/attend_sweep.py --styles prefetch regs --block-n 32 64 --warps 4 8 --stages 3 --splits 1 2 3 \
  --out $OUT/sweep_regs.json 2>&1 | tee $OUT/sweep_regs.txt | grep -v "^$"
mkdir -p $OUT/ir && for f in $(grep -l "_split_kernel\|_regs_kernel" -r /tmp/tc --include=*.ttgir); do cp $f $OUT/ir/$(basename $(dirname $f))_$(basename $f); done
cd $OUT && tar czf ir.tgz ir && rm -rf ir
