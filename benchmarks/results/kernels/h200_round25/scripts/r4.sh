source .device/run/setup.sh
mkdir -p /root/out; cd /tmp && timeout 120 python3 $OLDPWD/.device/s25/variants.py 2>&1 | grep -v -i warn | tail -5 | cut -c1-1500
