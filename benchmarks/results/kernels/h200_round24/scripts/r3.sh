source .device/run/setup.sh
REPO=$PWD
cd /tmp && REPO=$REPO timeout 300 python3 $REPO/.device/s21/wsweep.py $OUT/window_sweep_long.json long 2>&1 | tail -4
