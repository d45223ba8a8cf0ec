source .device/run/setup.sh
cd /tmp && timeout 200 python3 $OLDPWD/.device/s25/diag.py 2>&1 | grep -v Warn | tail -30
