source .device/run/setup.sh
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
cd /tmp && timeout 200 $NCU --clock-control none --profile-from-start off --kernel-name regex:_split_kernel \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
  --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct,smsp__inst_executed.sum,sm__cycles_active.avg \
  python3 $OLDPWD/.device/s25/ncu_variants.py > $OUT/ncu_variants.txt 2>&1
grep -E "ran |_split_kernel|Duration|DRAM Throughput|dram__bytes_read|lts__t_sector_hit|inst_executed.sum|cycles_active.avg|Achieved Occupancy|Warp Cycles Per Issued|No Eligible|Block Limit|Registers Per|Waves Per" $OUT/ncu_variants.txt | cut -c1-150
