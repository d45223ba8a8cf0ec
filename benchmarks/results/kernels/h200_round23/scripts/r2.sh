source .device/run/setup.sh
cd /tmp && cp $OLDPWD/.device/s20/pdl_parts.py . 
timeout 200 python3 pdl_parts.py 8 2>&1 | tail -9
timeout 120 python3 pdl_parts.py 1 2>&1 | tail -9
cd $OLDPWD
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 200 $NCU --clock-control none --profile-from-start off -k regex:_topk_union_kernel --section SourceCounters --section WarpStateStats --section LaunchStats --import-source yes -o $OUT/sel_b1 python3 benchmarks/profile_step.py --batch 1 --score-dtype int8 2>&1 | tail -3
$NCU -i $OUT/sel_b1.ncu-rep --page source --csv --print-source sass > $OUT/sel_b1_sass.csv 2>&1; wc -c $OUT/sel_b1_sass.csv; head -c 600 $OUT/sel_b1_sass.csv
$NCU -i $OUT/sel_b1.ncu-rep --page details > $OUT/sel_b1_details.txt 2>&1; tail -40 $OUT/sel_b1_details.txt
