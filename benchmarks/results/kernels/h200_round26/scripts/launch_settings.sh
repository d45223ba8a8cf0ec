# SWEEP=splits (many_splits.txt) or SWEEP=block (block_n.txt)
source .device/run/setup.sh
cd /tmp && timeout 500 python3 $OLDPWD/benchmarks/results/kernels/h200_round26/scripts/launch_settings.py ${SWEEP:-splits} 2>&1 | grep -v -i warn | tail -70
