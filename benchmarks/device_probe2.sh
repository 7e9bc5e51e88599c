#!/usr/bin/env bash
# Probe 2: CUDA test failures in detail, Inductor option variants, ncu sections, Triton IR.
set -uo pipefail
export TRITON_CACHE_DIR=/tmp/tc
pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | grep -E "^E  |Error|passed|failed" | head -20; python benchmarks/dump_kernels.py
python benchmarks/ncu_probe.py $((2**28))
python benchmarks/ncu_probe.py $((2**28)) '{"coordinate_descent_tuning": true}'
python benchmarks/ncu_probe.py $((2**28)) '{"triton.persistent_reductions": false}'
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
timeout 300 $NCU --clock-control none -k regex:triton_per --launch-skip 2 --launch-count 1 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section InstructionStats --section ComputeWorkloadAnalysis \
  python benchmarks/ncu_probe.py $((2**26)) > $OUT/ncu.txt 2>&1
grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Size|Grid Size|Executed Ipc|Issue Slots Busy|Stall|Shared Memory|Warp Cycles Per Issued" $OUT/ncu.txt | head -40
f=$(grep -rl "triton_per_fused" /tmp/tc --include=*.ttgir | head -1); cp "$f" $OUT/kernel.ttgir 2>/dev/null
f=$(grep -rl "triton_per_fused" /tmp/tc --include=*.ptx | head -1); cp "$f" $OUT/kernel.ptx 2>/dev/null
ls $OUT
