#!/usr/bin/env bash
# One device call: peers installed from .peers (carry it), then the end-to-end measurements.
# Usage on the device: bash benchmarks/device_e2e.sh "MODELS" "SETUPS" [extra steps...]
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/peers .peers/*.whl \
  && export PYTHONPATH=/tmp/peers:${PYTHONPATH:-}
export PYTHONPATH=$PWD:$PYTHONPATH
out=${OUT:-/tmp/out}
python3 -m flashcompile train-bench --models "$1" ${2:+--setups "$2"} --steps 12 --warmup 4 \
  --json "$out/train_bench_${1//,/_}.json" --png "$out/train_bench_${1//,/_}.png" \
  2>"$out/train_bench_err.txt"
