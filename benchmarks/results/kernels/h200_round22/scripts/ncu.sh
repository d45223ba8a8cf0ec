set -x
bash .device/run/setup.sh
export PYTHONPATH=/root/src
cat /proc/version | head -1
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for B in 1 8; do
  timeout 240 $NCU --clock-control none --profile-from-start off \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
    python3 .device/s19/profile_step.py $B int8 1 > $OUT/ncu_b${B}_int8.txt 2>&1
  tail -5 $OUT/ncu_b${B}_int8.txt
done
cd $OUT && tar czf ncu.tgz *.txt
