#!/usr/bin/env bash
# The checks that need an accelerator, in one run of at most 10 minutes on a CUDA GPU machine:
#   1. `keel demo` on the GPU (bf16 autocast where the device has it),
#   2. one GRPO step (8 x 8 x 1,024 tokens) and one SFT step on the Qwen3-0.6B shape, with peak
#      device memory (benchmarks/gpu_steps.py),
#   3. `keel parity` of torch:cuda:bf16 against onnxruntime:cpu:fp32 on the demo's model.
# Results go to $OUT (default runs/gpu_check): one log per check and summary.json.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
[ -x .venv/bin/python ] || TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0} ./setup.sh > "$OUT/setup.log" 2>&1
PY=.venv/bin/python
$PY -c "import torch; assert torch.accelerator.is_available(), 'no accelerator'; print(torch.accelerator.current_accelerator(), torch.__version__)" \
  | tee "$OUT/device.txt" || { echo "gpu_check: no accelerator here"; exit 2; }

status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, remember a failure
  local name=$1 limit=$2; shift 2
  echo "gpu_check: $name"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name rc=$rc in $((SECONDS - t0))s"
  [ $rc -eq 0 ] || status=1
}
step demo 240 .venv/bin/keel demo --device cuda --out "$OUT/demo"
step steps 240 $PY benchmarks/gpu_steps.py
step parity 90 .venv/bin/keel parity --model "$OUT/demo/model" --reference torch:cuda:bf16 \
  --candidate onnxruntime:cpu:fp32 --out "$OUT/parity"

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def last_json(name):
    try:
        return json.loads((out / f"{name}.log").read_text().strip().splitlines()[-1])
    except Exception:
        return None
summary = {"demo": last_json("demo"), "steps": last_json("steps"),
           "parity": json.loads((out / "parity" / "parity.json").read_text()) if (out / "parity" / "parity.json").exists() else None}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if k != "parity"}))
PYEOF
exit $status
