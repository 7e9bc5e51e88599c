#!/usr/bin/env bash
# One 1-GPU device call (after benchmarks/device.sh staged the package): every cuda-marked test that
# fits one GPU, then the training-memory table (issue 4). Results go to $OUT.
set -uo pipefail
pytest -q -p no:cacheprovider -m cuda tests/ 2>&1 | tail -15
python -m flashcompile memory --models gpt2_124m,llama_1b --batch 4 --seq 1024 \
  --csv "$OUT/memory_h100.csv" --json "$OUT/memory_h100.json" --png "$OUT/memory_h100.png"
python -m flashcompile memory --models llama_3b --setups torch_adamw_fp32,adamw_flash,adamw_flash_release \
  --batch 2 --seq 1024 --json "$OUT/memory_3b_h100.json"
