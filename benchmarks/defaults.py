"""Evidence for the solvers' defaults: candidate settings side by side on the shipped problems.

    python -m benchmarks.defaults [--solvers kfac] [--problems autoencoder,mlp,cnn]
                                  [--budget 30]

Each candidate trains for the same wall-clock budget (compilation excluded) from the same
initialisation on the same batches as :mod:`benchmarks.time_to_loss`, and the final
probe loss is recorded. ``"defaults"`` is the solver called with no tuning argument, so
the file shows at a glance whether a default is the best candidate measured.
Writes ``benchmarks/results/defaults_<solver>.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import curvax
from benchmarks import time_to_loss

CANDIDATES = {
    "kfac": {
        "defaults": {},
        "paper (Algorithm 1: inverses every step, no momentum)": dict(
            curvax.KRON_PAPER_SETTINGS),
        "free momentum (unbounded 2×2 solve, Martens & Grosse)": dict(momentum_bounds=None),
        "no momentum": dict(momentum=False),
        "inverses every step": dict(inverse_period=1),
        "γ = 1e-2": dict(gamma=1e-2),
        "τ = 1e-3": dict(tau=1e-3),
    },
    "curveball": {
        "defaults": {},
        "λ₀ = 1": dict(damping=1.0),
        "λ₀ = 0.1": dict(damping=0.1),
    },
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--solvers", default="kfac")
  parser.add_argument("--problems", default="autoencoder,mlp,cnn")
  parser.add_argument("--budget", type=float, default=30.0)
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--candidates", default="",
                      help="candidate labels separated by ';' (default: all)")
  args = parser.parse_args(argv)
  for solver in args.solvers.split(","):
    evidence = {"budget_seconds": args.budget, "scale": args.scale, "problems": {}}
    for name in args.problems.split(","):
      prob = time_to_loss.problem(name, scale=args.scale)
      rows = {}
      chosen = args.candidates.split(";") if args.candidates else CANDIDATES[solver]
      for label in chosen:
        kwargs = CANDIDATES[solver][label]
        tx = time_to_loss.SOLVERS[solver](prob.loss, **kwargs)
        record = time_to_loss.run_one(prob, tx, second_order=True, budget=args.budget,
                                      seed=0, eval_every=args.budget / 10)
        rows[label] = {"kwargs": kwargs, "final_loss": record["loss"][-1],
                       "steps": record["step"][-1], "curve": record["loss"]}
        print(json.dumps({"solver": solver, "problem": name, "candidate": label,
                          "final_loss": record["loss"][-1], "steps": record["step"][-1]},
                         ensure_ascii=False), flush=True)
      evidence["problems"][name] = {"best": _best(rows), "candidates": rows}
    path = time_to_loss.RESULTS / f"defaults_{solver}.json"
    if path.exists():  # earlier runs of other problems and candidates are kept
      earlier = json.loads(path.read_text())["problems"]
      for name, entry in evidence["problems"].items():
        merged = {**earlier.get(name, {}).get("candidates", {}), **entry["candidates"]}
        entry.update(candidates=merged, best=_best(merged))
      evidence["problems"] = {**earlier, **evidence["problems"]}
    path.write_text(json.dumps(evidence, indent=1, ensure_ascii=False))


def _best(rows: dict) -> str:
  """The candidate with the lowest finite final loss."""
  return min(rows, key=lambda k: np.nan_to_num(rows[k]["final_loss"], nan=np.inf,
                                               posinf=np.inf))


if __name__ == "__main__":
  main()
