"""Weak scaling of every solver's step over 1, 2, 4 and 8 host devices.

    python -m benchmarks.scaling [--per-device-batch 32] [--repeats 10]
    python -m benchmarks.scaling --flops-only   # 1-device step FLOPs (XLA cost analysis)

The batch per device is fixed and the global batch grows with the device count; the
step is one ``jax.jit`` over inputs sharded along the batch (XLA's SPMD partitioner
inserts the reductions). Prints one JSON line per (solver, devices) with the step time
as a ratio to the 1-device step and the bytes all-reduced per step, read from the
compiled HLO; writes ``benchmarks/results/scaling.{json,png}``.

On this project's 2-core CPU machine the 8 "devices" share two cores, so the time
ratios measure the partitioned program's overhead rather than a speed-up; on a real
multi-accelerator host run the same script (without the forced device count).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import curvax  # noqa: E402
from benchmarks.timing import median_times  # noqa: E402
from curvax import kron  # noqa: E402
from curvax.problems import models, training  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MODEL = models.MLP(features=(256, 128, 10))
LOSS = "softmax_cross_entropy"
DEVICE_COUNTS = (1, 2, 4, 8)

SOLVERS = {
    "sgd": lambda: optax.sgd(1e-2),
    "curveball": lambda: curvax.curveball(LOSS, damping=1.0),
    "hessian_free": lambda: curvax.hessian_free(LOSS, max_cg_iters=10, min_cg_iters=10),
    "sqn": lambda: curvax.sqn(LOSS, learning_rate=0.1),
    "lsr1": lambda: curvax.lsr1(LOSS, learning_rate=0.1),
    "kfac": lambda: curvax.kfac(LOSS, inverse_period=5),
    "kflr": lambda: curvax.kflr(LOSS, inverse_period=5),
    "kfra": lambda: curvax.kfra(LOSS, inverse_period=5,
                                activations=kron.chain_activations(MODEL)),
}

_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def all_reduce_bytes(hlo_text: str) -> int:
  """Bytes of every all-reduce result in a compiled HLO module (tuples included).

  A static count: an all-reduce inside a loop body (Hessian-free's CG iteration) is
  counted once, though it runs once per iteration.
  """
  total = 0
  for line in hlo_text.splitlines():
    if " all-reduce(" not in line and " all-reduce-start(" not in line:
      continue
    result_type = line.split("=", 1)[1].split("all-reduce", 1)[0]
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result_type):
      if dtype in _BYTES:
        total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def measure(per_device_batch: int, repeats: int):
  model = MODEL
  loss = curvax.losses.get(LOSS)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
  rows = []
  for name, make in SOLVERS.items():
    runs, comm = {}, {}
    for n in DEVICE_COUNTS:
      mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n],
                           axis_types=(jax.sharding.AxisType.Auto,))
      batch = per_device_batch * n
      kx, ky = jax.random.split(jax.random.PRNGKey(n))
      x = jax.device_put(jax.random.uniform(kx, (batch, 784)),
                         NamedSharding(mesh, P("data")))
      y = jax.device_put(jax.random.randint(ky, (batch,), 0, 10),
                         NamedSharding(mesh, P("data")))
      replicated = NamedSharding(mesh, P())
      tx = make()
      p = jax.device_put(params, replicated)
      s = jax.device_put(tx.init(params), replicated)
      step = training.make_step(model, tx, loss, second_order=name != "sgd")
      comm[n] = all_reduce_bytes(step.lower(p, s, x, y).compile().as_text())
      runs[n] = lambda step=step, p=p, s=s, x=x, y=y: step(p, s, x, y)[0]
    times = median_times({str(n): f for n, f in runs.items()}, repeats=repeats)
    for n in DEVICE_COUNTS:
      row = {"solver": name, "devices": n, "global_batch": per_device_batch * n,
             "time_ratio_to_1_device": round(times[str(n)] / times["1"], 3),
             "all_reduce_bytes_per_step": comm[n]}
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def step_flops(per_device_batch: int) -> dict:
  """XLA's cost-analysis FLOPs of each solver's 1-device step (a static count: a loop
  body, e.g. Hessian-free's CG iteration, counts once, as in :func:`all_reduce_bytes`)."""
  loss = curvax.losses.get(LOSS)
  params = MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
  x = jnp.zeros((per_device_batch, 784))
  y = jnp.zeros((per_device_batch,), jnp.int32)
  flops = {}
  for name, make in SOLVERS.items():
    tx = make()
    step = training.make_step(MODEL, tx, loss, second_order=name != "sgd")
    cost = step.lower(params, tx.init(params), x, y).compile().cost_analysis()
    flops[name] = float((cost[0] if isinstance(cost, list) else cost)["flops"])
    print(json.dumps({"solver": name, "batch": per_device_batch,
                      "step_flops": flops[name]}), flush=True)
  return flops


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for name in SOLVERS:
    mine = [r for r in rows if r["solver"] == name]
    ax.plot([r["devices"] for r in mine], [r["time_ratio_to_1_device"] for r in mine],
            marker="o", label=name)
  ax.set(xscale="log", xticks=DEVICE_COUNTS, xticklabels=DEVICE_COUNTS,
         xlabel="devices (fixed batch per device)", ylabel="step time / 1-device step",
         title=f"weak scaling on {jax.default_backend()}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per-device-batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--flops-only", action="store_true")
  args = parser.parse_args()
  if args.flops_only:
    step_flops(args.per_device_batch)
    return
  rows = measure(args.per_device_batch, args.repeats)
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "scaling.json").write_text(json.dumps(rows, indent=1))
  plot(rows, RESULTS / "scaling.png")


if __name__ == "__main__":
  main()
