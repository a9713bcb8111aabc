#!/usr/bin/env bash
# One-shot calibration of llama-3.1-8b (bf16, all 32 layers, random weights) on one NVIDIA H200.
#
#   OUT=/some/dir bash calibrate/h200_calibrate.sh
#
# Writes $OUT/nvidia-h200-llama-3.1-8b.json (a fleetsim-profile/1 roofline profile with NVML
# power when nvidia-ml-py is installed) and $OUT/nvidia-h200-llama-3.1-8b.grid.parquet (the raw
# grid), plus $OUT/calibrate.log. Needs a CUDA build of torch; downloads nothing. The grid stops
# starting new points after --budget-s seconds, so the whole run stays under ~10 minutes
# (about 16 GB of weights, 1 s per grid point for the power readings, two layer counts 32 and 16
# so that overhead_s and overhead_per_layer_s are both identified).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-profiles}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("torch is not installed: install a CUDA build of torch first")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
try:
    import pynvml  # noqa: F401
except ImportError:
    print("note: pynvml (nvidia-ml-py) is missing: power will not be measured")
PYEOF
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv || true

PROFILE="$OUT/nvidia-h200-llama-3.1-8b.json"
timeout 590 "$PY" -m calibrate --model llama-3.1-8b --device cuda --dtype bf16 \
    --budget-s 420 --out "$PROFILE" 2>&1 | tee "$OUT/calibrate.log"

"$PY" - "$PROFILE" <<'PYEOF'
import json, sys
from calibrate.fit import predicted_vs_measured
path = sys.argv[1]
rows = predicted_vs_measured(path)
d = json.load(open(path))
worst = max(abs(r["rel_err"]) for r in rows)
print(f"{len(rows)} grid points, worst |rel err| {worst:.1%} (profile says {d['fit']['max_rel_err']:.1%}),"
      f" R2 {d['fit']['r2']}, FLOP check {d['flop_check']['prefill_rel_err']:+.2%} / "
      f"{d['flop_check']['decode_rel_err']:+.2%}, power {d['power']}")
PYEOF
