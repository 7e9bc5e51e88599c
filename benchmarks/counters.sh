#!/usr/bin/env bash
# Hardware counters and SASS of each rule's group kernel (run from the repo root on a CUDA machine
# with ncu): timings first (no profiler), then one ncu'd step per rule, then static SASS counts.
# Usage: bash benchmarks/counters.sh N Rule ...   (writes $OUT/counters.tgz)
set -uo pipefail
n=$1; shift
work=/tmp/counters && rm -rf "$work" && mkdir -p "$work"
export PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR=$work/triton
# the first run compiles (and fills Triton's cache): dump each rule's new cache entries there
KERNEL_DUMP=$work/kernels python benchmarks/kernel_profile.py "$n" "$@" 2>&1 | tee "$work/profile.txt"
# only the group kernels (Inductor's persistent reductions over rows of 32: a summing rule's two
# passes, not the sums' bookkeeping), each section a set of replays: NCU_SECTIONS="SpeedOfLight
# WarpStateStats" keeps a call short (2 rules at 2^26 params did not finish in 90 s with all seven)
sections=${NCU_SECTIONS:-SpeedOfLight Occupancy LaunchStats WarpStateStats InstructionStats ComputeWorkloadAnalysis MemoryWorkloadAnalysis}
ncu --clock-control none --nvtx --nvtx-include measure/ --kernel-name regex:^triton_per_fused \
  $(printf -- '--section %s ' $sections) \
  -o "$work/rules" -f python benchmarks/kernel_profile.py "$n" "$@" > "$work/ncu_run.txt" 2>&1
ncu -i "$work/rules.ncu-rep" --page details > "$work/ncu_details.txt" 2>&1
python benchmarks/sass_histogram.py "$work/kernels" | tee "$work/sass.txt"
tar czf "${OUT:-.}/counters.tgz" -C "$work" --exclude triton --exclude '*.ncu-rep' .
grep -E "^  *(Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Registers Per Thread|Achieved Occupancy|Executed Ipc Active|Theoretical Occupancy|Block Limit Registers)" "$work/ncu_details.txt" | head -150
