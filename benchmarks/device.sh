#!/usr/bin/env bash
# One device call: stage the package without pip (the device has no build backend offline), run the
# CUDA tests, then the given benchmark command. Usage: bash benchmarks/device.sh python benchmarks/X.py
set -uo pipefail
export PYTHONUNBUFFERED=1
stage=/tmp/flashcompile_src
rm -rf "$stage" && mkdir -p "$stage"
cp -r flashcompile "$stage/" && cp -r rules "$stage/flashcompile/rules"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15
fi
"$@"
