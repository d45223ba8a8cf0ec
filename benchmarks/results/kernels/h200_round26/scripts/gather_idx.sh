# the split kernel taking each step's indices from its split's, loaded once (gather_idx.py), A/B
source .device/run/setup.sh
cd /tmp && CUDA_LAUNCH_BLOCKING=1 timeout 200 python3 $OLDPWD/benchmarks/results/kernels/h200_round26/scripts/gather_idx.py 2>&1 | grep -v -i warn | tail -30
