"""curvax's losses against optax's: time ratio per (loss, size, operation), goal ≤ 1.0.

    python -m benchmarks.loss_cost

For every loss optax also has, curvax's ``value``, ``grad`` (w.r.t. the outputs) and
``value_and_grad`` are timed side by side with the same operation on the objective a
user writes with optax (``curvax.problems.training.optax_objective``: optax's loss with
curvax's reduction), jitted, medians of interleaved calls in one process. Then the SGD
step on the MLP 784-1000-500-250-10 of ``benchmarks.step_cost`` (batch 256), once with
each curvax loss and once with optax's: what a slower loss costs a whole step. Each row
also gives the ratio of XLA's ``bytes accessed`` of the two compiled programs, which the
machine's load does not move.
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import optax

import curvax
from benchmarks.timing import median_times
from curvax.problems import models, training

# (loss, outputs shape): the MLP classifier's logits, the autoencoder's pixels
# (the paper-scale autoencoder: batch 1000 of 784 outputs) and a large case.
CASES = [
    ("softmax_cross_entropy", (256, 10)),
    ("softmax_cross_entropy", (4096, 1000)),
    ("softmax_cross_entropy/soft", (256, 10)),
    ("softmax_cross_entropy/soft", (4096, 1000)),
    ("sigmoid_binary_cross_entropy", (1000, 784)),
    ("sigmoid_binary_cross_entropy", (4096, 1000)),
    ("squared_error", (1000, 784)),
    ("squared_error", (4096, 1000)),
]


def _targets(case: str, key, shape):
  """Targets in the format the case names: labels, class probabilities, [0, 1], reals."""
  if case == "softmax_cross_entropy":
    return jax.random.randint(key, shape[:-1], 0, shape[-1])
  if case == "softmax_cross_entropy/soft":
    return jax.nn.softmax(jax.random.normal(key, shape))
  if case == "sigmoid_binary_cross_entropy":
    return jax.random.uniform(key, shape)
  return jax.random.normal(key, shape)


def _bytes_accessed(fn, *args):
  """XLA's count of the compiled program's memory traffic: a noise-free companion to time."""
  analysis = fn.lower(*args).compile().cost_analysis()
  return (analysis or {}).get("bytes accessed")


def _operations(objective):
  return {"value": jax.jit(objective), "grad": jax.jit(jax.grad(objective)),
          "value_and_grad": jax.jit(jax.value_and_grad(objective))}


def loss_rows(repeats: int):
  for case, shape in CASES:
    loss = curvax.losses.get(case.split("/")[0])
    ko, kt = jax.random.split(jax.random.PRNGKey(0))
    outputs, targets = jax.random.normal(ko, shape), _targets(case, kt, shape)
    candidates = {
        "curvax": {"value": jax.jit(loss.value), "grad": jax.jit(loss.grad),
                   "value_and_grad": jax.jit(loss.value_and_grad)},
        "optax": _operations(training.optax_objective(loss)),
    }
    fns = {f"{who}/{op}": (lambda fn=fn: fn(outputs, targets))
           for who, ops in candidates.items() for op, fn in ops.items()}
    times = median_times(fns, repeats=repeats)
    for op in candidates["curvax"]:
      row = {"loss": case, "shape": list(shape), "op": op,
             "ratio": round(times[f"curvax/{op}"] / times[f"optax/{op}"], 3)}
      traffic = [_bytes_accessed(candidates[who][op], outputs, targets)
                 for who in ("curvax", "optax")]
      if all(traffic):
        row["bytes_accessed_ratio"] = round(traffic[0] / traffic[1], 3)
      yield row


def sgd_step_rows(repeats: int, batch: int = 256):
  kx, kt, kp = jax.random.split(jax.random.PRNGKey(1), 3)
  model = models.MLP(features=(1000, 500, 250, 10))
  x = jax.random.uniform(kx, (batch, 784))
  params = model.init(kp, x)
  predict = lambda p: model.apply(p, x)
  sgd = optax.sgd(1e-3)
  state = sgd.init(params)
  for case in ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "squared_error"):
    loss = curvax.losses.get(case)
    targets = _targets(case, kt, (batch, 10))
    steps = {
        who: jax.jit(lambda p, s, objective=objective: training.first_order_update(
            sgd, objective, p, s, predict, targets)[:2])
        for who, objective in (("curvax", loss.value),
                               ("optax", training.optax_objective(loss)))}
    times = median_times({who: (lambda step=step: step(params, state))
                          for who, step in steps.items()}, repeats=repeats)
    traffic = [_bytes_accessed(steps[who], params, state) for who in ("curvax", "optax")]
    row = {"loss": case, "op": "sgd_step", "model": "mlp784-1000-500-250-10",
           "batch": batch, "ratio": round(times["curvax"] / times["optax"], 3)}
    if all(traffic):
      row["bytes_accessed_ratio"] = round(traffic[0] / traffic[1], 3)
    yield row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--skip-steps", action="store_true",
                      help="only the losses, not the MLP SGD steps")
  args = parser.parse_args()
  rows = loss_rows(args.repeats)
  if not args.skip_steps:
    rows = itertools.chain(rows, sgd_step_rows(args.repeats))
  for row in rows:
    print(json.dumps({**row, "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
  main()
