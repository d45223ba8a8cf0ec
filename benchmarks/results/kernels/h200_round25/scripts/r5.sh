source .device/run/setup.sh
cd /tmp && timeout 100 python3 $OLDPWD/.device/s25/slots.py 2>&1 | grep -v -i warn | tail -6
