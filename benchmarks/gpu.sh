#!/usr/bin/env bash
# The paper's configuration (looped GPT, 135M parameters, tau=32, sequence 128) on one GPU, in one run of
# at most about 8 minutes. Writes benchmarks/results/gpu.json and gpu.md; commit them only if measured on a GPU.
# Usage (on the GPU machine, from the repository root): bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if ! $PY -c "import looptrace" 2>/dev/null; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.cuda.get_device_name(0))"
PYTHONUNBUFFERED=1 $PY -m looptrace.cli bench gpu --device "${DEVICE:-cuda}" --out "${OUT:-benchmarks/results}"
