#!/usr/bin/env bash
# One script for a session that has a CUDA GPU (about 5 minutes at most):
#   1. the GPU tests (pytest -m gpu; includes context parallel over NCCL, a world of min(GPUs, 2))
#   2. attend check --device cuda          (every backend vs the float64 reference, fwd + bwd)
#   3. attend bench --suite gpu --device cuda, saved as JSON + PNG + markdown in benchmarks/results/
#   4. attend bench --suite structured --device cuda (windows, packed documents, l2, varlen_attn), bfloat16
#   5. attend bench --suite decode --device cuda (with_kvcache contiguous and paged vs SDPA, GB/s)
# Run from anywhere: `bash benchmarks/gpu_check.sh`. Needs torch with CUDA, einops, rich, matplotlib, pytest
# (PYTHON=/path/to/python to pick the interpreter). Exit status: 0 when all three passed.
# Afterwards: commit benchmarks/results/gpu-*, and set PRIORITY["cuda"] in src/attend/dispatch.py from the
# table, citing the file (device, torch version, date).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out=benchmarks/results
mkdir -p "$out"
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || { echo "no CUDA device visible to torch" >&2; exit 2; }
tag="gpu-${gpu}-$(date -u +%Y%m%d-%H%M)"
status=0

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} | tee "$out/$tag-env.txt"

echo "== 1/5 pytest -m gpu"
timeout 80 "$PY" -m pytest tests -m gpu -q -x -p no:cacheprovider 2>&1 | tail -n 25 || status=1

echo "== 2/5 attend check --device cuda (the grid includes window / documents / l2 cases)"
timeout 70 "$PY" -m attend check --device cuda > "$out/$tag-check.txt" 2>&1
rc=$?; tail -n 40 "$out/$tag-check.txt"; [ "$rc" -eq 0 ] || status=1

echo "== 3/5 attend bench --suite gpu --device cuda"
timeout 80 "$PY" -m attend bench --suite gpu --device cuda --min-time 0.1 \
    --json "$out/$tag.json" --plot "$out/$tag.png" --markdown "$out/$tag.md" || status=1

echo "== 4/5 attend bench --suite structured --device cuda"
timeout 40 "$PY" -m attend bench --suite structured --device cuda --dtype bfloat16 \
    --json "$out/$tag-structured.json" --markdown "$out/$tag-structured.md" || status=1

echo "== 5/5 attend bench --suite decode --device cuda"
timeout 25 "$PY" -m attend bench --suite decode --device cuda \
    --json "$out/$tag-decode.json" --markdown "$out/$tag-decode.md" || status=1

echo "gpu_check: exit $status; results in $out/$tag.*"
exit $status
