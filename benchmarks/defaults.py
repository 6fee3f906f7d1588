"""Evidence for the solvers' defaults: candidate settings side by side on the shipped problems.

    python -m benchmarks.defaults [--solvers kfac] [--problems autoencoder,mlp,cnn]
                                  [--budget 30 | --steps 150[,150,40]] [--seeds 3]

Each candidate trains for the same wall-clock budget (compilation excluded) from the same
initialisation on the same batches as :mod:`benchmarks.time_to_loss`, and the final
probe loss is recorded. ``--steps`` instead trains every candidate for the same number
of steps (one count, or one per problem), the fair comparison on a shared machine whose
wall-clock is unreliable; the recorded ``seconds`` then only indicate step cost.
``"defaults"`` is the solver called with no tuning argument, so
the file shows at a glance whether a default is the best candidate measured.
Writes ``benchmarks/results/defaults_<solver>.json``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import curvax
from benchmarks import time_to_loss
from curvax.problems import suite

def _inverse_count(count):
  """Byrd et al.'s 1/k step (second_order_comparison.md §3.4), k from 1."""
  return 1.0 / (1.0 + count)


_QUASI_NEWTON = {
    "defaults": {},
    "paper without line search (fixed step, learning_rate=1)": dict(step_size="fixed"),
    "fixed step, learning_rate=0.1": dict(step_size="fixed", learning_rate=0.1),
    "fixed step, learning_rate=0.01": dict(step_size="fixed", learning_rate=0.01),
    "fixed step, 1/k schedule (Byrd et al.)": dict(step_size="fixed",
                                                   learning_rate=_inverse_count),
}

CANDIDATES = {
    "kfac": {
        "defaults": {},
        "paper (Algorithm 1: inverses every step, no momentum)": dict(
            curvax.KRON_PAPER_SETTINGS),
        "γ = 1e-3 (the default before)": dict(gamma=1e-3),
        "γ = 1e-4": dict(gamma=1e-4),
        "τ = 1e-3": dict(tau=1e-3),
        "no γ rule (γ fixed)": dict(gamma_period=0),
        "factors every 5 steps": dict(factor_period=5),
        "free momentum (unbounded 2×2 solve, Martens & Grosse)": dict(momentum_bounds=None),
        "no momentum": dict(momentum=False),
        "inverses every step": dict(inverse_period=1),
    },
    "curveball": {
        "defaults": {},
        "paper without batch normalisation (λ₀ = 10)": dict(damping=10.0),
        "λ₀ = 1": dict(damping=1.0),
        "λ₀ = 0.1": dict(damping=0.1),
    },
    "hessian_free": {
        "defaults": {},
        "λ₀ = 1": dict(damping=1.0),
        "λ₀ = 0.1": dict(damping=0.1),
        "λ₀ = 0.01": dict(damping=0.01),
        "λ₀ = 0.001": dict(damping=0.001),
        "no escalation (Martens' fixed 3/2 per failure: the default before)":
            dict(escalate_damping=False),
    },
    "sqn": {**_QUASI_NEWTON,
            "no trust region (the model step alone: the default before)":
                dict(trust_region=False)},
    "lsr1": {**_QUASI_NEWTON,
             "no trust region (the model step alone: the default before)":
                 dict(trust_region=False),
             "no next-batch check (ρ on the step's batch alone: the default before)":
                 dict(check_next_batch=False)},
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--solvers", default="kfac")
  parser.add_argument("--problems", default="autoencoder,mlp,cnn")
  parser.add_argument("--budget", type=float, default=30.0)
  parser.add_argument("--steps", default="",
                      help="train a fixed number of steps instead of --budget seconds: "
                           "one count, or one per problem separated by ','")
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--candidates", default="",
                      help="candidate labels separated by ';' (default: all)")
  parser.add_argument("--seeds", type=int, default=1,
                      help="run each candidate with the solver's seed= 0, 1, …, N-1 (the "
                           "random numbers of KFAC's sampled targets) and record the "
                           "mean final loss: the autoencoder's plateau escape varies "
                           "with them")
  args = parser.parse_args(argv)
  problems = args.problems.split(",")
  steps = [int(n) for n in args.steps.split(",")] if args.steps else None
  if steps and len(steps) == 1:
    steps = steps * len(problems)
  if steps and len(steps) != len(problems):
    parser.error("--steps: one count, or one per problem")
  for solver in args.solvers.split(","):
    evidence = ({"steps": dict(zip(problems, steps))} if steps
                else {"budget_seconds": args.budget})
    evidence.update(scale=args.scale, problems={})
    for index, name in enumerate(problems):
      prob = time_to_loss.problem(name, scale=args.scale)
      rows = {}
      chosen = args.candidates.split(";") if args.candidates else CANDIDATES[solver]
      for label in chosen:
        kwargs = CANDIDATES[solver][label]
        records = []
        for seed in range(args.seeds):
          seeded = dict(kwargs, seed=seed) if args.seeds > 1 else kwargs
          tx = time_to_loss.SOLVERS[solver](prob.loss, **seeded)
          if steps:
            records.append(run_steps(prob, tx, steps[index], evaluations=10))
          else:
            records.append(time_to_loss.run_one(
                prob, tx, second_order=True, budget=args.budget, seed=0,
                eval_every=args.budget / 10))
        record = records[0]
        rows[label] = {"kwargs": _printable(kwargs),
                       "final_loss": float(np.mean([r["loss"][-1] for r in records])),
                       "steps": record["step"][-1]}
        if args.seeds > 1:  # the mean above; each seed's run below
          rows[label].update(seeds=args.seeds,
                             final_losses=[r["loss"][-1] for r in records],
                             curves=[r["loss"] for r in records])
        else:
          rows[label]["curve"] = record["loss"]
        if steps:
          rows[label].update(curve_steps=record["step"],
                             seconds=round(record["seconds"][-1], 1))
        print(json.dumps({"solver": solver, "problem": name, "candidate": label,
                          "final_loss": rows[label]["final_loss"],
                          "steps": record["step"][-1]},
                         ensure_ascii=False), flush=True)
        # Saved after every candidate: a long run stopped early keeps what it measured.
        evidence["problems"][name] = {"best": _best(rows), "candidates": rows}
        _save(solver, evidence)


def _save(solver: str, evidence: dict) -> None:
  """Write ``defaults_<solver>.json``, keeping earlier runs' problems and candidates."""
  path = time_to_loss.RESULTS / f"defaults_{solver}.json"
  evidence = json.loads(json.dumps(evidence))  # the caller's copy stays unmerged
  if path.exists():
    earlier = json.loads(path.read_text())
    for key, value in earlier.items():  # notes and other keys this run does not write
      evidence.setdefault(key, value)
    for name, entry in evidence["problems"].items():
      merged = {**earlier["problems"].get(name, {}).get("candidates", {}),
                **entry["candidates"]}
      entry.update(candidates=merged, best=_best(merged))
    evidence["problems"] = {**earlier["problems"], **evidence["problems"]}
    if "steps" in evidence:
      evidence["steps"] = {**earlier.get("steps", {}), **evidence["steps"]}
  path.write_text(json.dumps(evidence, indent=1, ensure_ascii=False))


def run_steps(prob, tx, steps: int, *, evaluations: int, seed: int = 0) -> dict:
  """Train ``steps`` steps; the probe loss at ``evaluations`` evenly spaced points."""
  run = suite.Run(prob, tx, second_order=True, seed=seed)
  for k in range(1, evaluations + 1):
    run.advance(steps=round(k * steps / evaluations))
  return run.record


def _printable(kwargs: dict) -> dict:
  """``kwargs`` for the JSON: a schedule (a callable) by its name."""
  return {k: getattr(v, "__name__", repr(v)) if callable(v) else v
          for k, v in kwargs.items()}


def _best(rows: dict) -> str:
  """The candidate with the lowest finite final loss."""
  return min(rows, key=lambda k: np.nan_to_num(rows[k]["final_loss"], nan=np.inf,
                                               posinf=np.inf))


if __name__ == "__main__":
  main()
