source .device/run/setup.sh
cd /tmp && cp $OLDPWD/.device/s20/pdl_parts.py .
for args in "8 32" "1 32" "8 128" "8 128 cache" "1 128 cache"; do timeout 100 python3 pdl_parts.py $args 2>&1 | tail -9 | tee -a $OUT/pdl_parts.txt; done
