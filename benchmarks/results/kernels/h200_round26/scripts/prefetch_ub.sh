# the batch-1 attention with a share of its K/V already in L2 (prefetch_ub.py)
source .device/run/setup.sh
cd /tmp && timeout 300 python3 $OLDPWD/benchmarks/results/kernels/h200_round26/scripts/prefetch_ub.py 2>&1 | grep -v -i warn | tail -20
