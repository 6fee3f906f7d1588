"""Cost of a KFAC step with its curvature on a sub-batch (``curvature_fraction``),
relative to a tuned-optax Adam step on the same model and batch.

    python -m benchmarks.curvature_fraction [--problems autoencoder,mlp,cnn] [--repeats 20]

The shipped problems at their batch sizes (:mod:`curvax.problems.suite`),
one process, steps timed round-robin (:func:`benchmarks.timing.median_times`); each timed
unit is 10 consecutive steps, so the every-5-steps inverse refresh and τ rule and the
every-20-steps γ rule count at their true frequencies. Writes
``benchmarks/results/curvature_fraction.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import optax

import curvax
from benchmarks.timing import median_times
from curvax.problems import suite, training

# (label, curvax.kfac arguments): the fractions, and the cheapest setting with the factor
# estimate every 5 steps as well.
CONFIGS = (("kfac f=1.0", dict(curvature_fraction=1.0)),
           ("kfac f=0.5", dict(curvature_fraction=0.5)),
           ("kfac f=0.25", dict(curvature_fraction=0.25)),
           ("kfac f=0.25 factor_period=5", dict(curvature_fraction=0.25, factor_period=5)))
CYCLE = 10
RESULTS = pathlib.Path(__file__).parent / "results"


def _runner(prob: suite.Problem, tx, second_order: bool):
  batches = suite.stream(prob, seed=0)
  x, y = next(batches)
  params = prob.model.init(jax.random.PRNGKey(0), x)
  step = training.make_step(prob.model, tx, prob.loss, second_order=second_order)
  carry = [params, tx.init(params)]

  def cycle():
    for _ in range(CYCLE):
      carry[0], carry[1], value = step(carry[0], carry[1], x, y)
    return value
  return cycle


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--problems", default="autoencoder,mlp,cnn")
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args(argv)
  results = {}
  for name in args.problems.split(","):
    prob = suite.problem(name)
    fns = {"adam": _runner(prob, optax.adam(1e-3), False)}
    for label, kwargs in CONFIGS:
      fns[label] = _runner(prob, curvax.kfac(prob.loss, **kwargs), True)
    times = median_times(fns, repeats=args.repeats, warmup=1)
    results[name] = {k: round(t / times["adam"], 2) for k, t in times.items()}
    print(name, json.dumps(results[name]), flush=True)
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "curvature_fraction.json").write_text(json.dumps(
      {"command": f"python -m benchmarks.curvature_fraction --problems {args.problems} "
                  f"--repeats {args.repeats}", "cycle": CYCLE,
       "step_time_over_adam": results}, indent=1))
  return results


if __name__ == "__main__":
  main()
