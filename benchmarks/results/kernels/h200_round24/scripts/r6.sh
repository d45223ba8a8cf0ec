source .device/run/setup.sh
REPO=$PWD
cd /tmp && REPO=$REPO timeout 200 python3 $REPO/.device/s21/wsweep.py $OUT/window_sweep_mid.json mid 2>&1 | tail -4
