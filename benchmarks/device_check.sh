#!/usr/bin/env bash
# One device check in at most ~8 minutes: step_cost, cvp_cost and a short time_to_loss on
# whatever accelerator JAX finds, written to benchmarks/results/<dir>/ with the device name.
#
#   bash benchmarks/device_check.sh            # on a lent GPU: results/gpu/
#   bash benchmarks/device_check.sh --small    # a quick CPU check of this script
#
# Needs the project's environment (make's .venv, or PYTHON=...) and the MNIST wheel in .data/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="benchmarks/results/gpu"
REPEATS=20
TTL_ARGS=(--budget 15 --problems autoencoder,mlp)
if [[ "${1:-}" == "--small" ]]; then
  OUT="${DEVICE_CHECK_OUT:-/tmp/curvax_device_check}"
  REPEATS=2
  TTL_ARGS=(--budget 2 --scale 0.05 --problems mlp --solvers curveball,kfac)
fi
mkdir -p "$OUT"
"$PYTHON" -c 'import jax, json; d = jax.devices()[0]
print(json.dumps({"backend": jax.default_backend(), "device": d.device_kind,
                  "count": jax.device_count(), "jax": jax.__version__}))' > "$OUT/device.json"
cat "$OUT/device.json"
"$PYTHON" -m benchmarks.step_cost --repeats "$REPEATS" > "$OUT/step_cost.jsonl"
"$PYTHON" -m benchmarks.cvp_cost --repeats "$REPEATS" > "$OUT/cvp_cost.jsonl"
"$PYTHON" -m benchmarks.time_to_loss "${TTL_ARGS[@]}" --out "$OUT/time_to_loss" \
  > "$OUT/time_to_loss.md"
echo "device check written to $OUT"
