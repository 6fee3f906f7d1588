"""curvax.soap vs optax.adamw on the byte-level transformer: wall-clock to a validation loss.

    python -m benchmarks.soap_vs_adamw [--budget 60] [--small] [--soap-rates 3e-3,1e-2,3e-2]
                                       [--adamw-rates ...] [--seeds 0,1,2]

The workload is :mod:`benchmarks.transformer_lm`'s (its model, data, batches, validation
windows and training loop): every run gets the same wall-clock ``--budget`` of training
steps on the same batch stream (seed 0 unless ``--seeds``), one process, one optimiser
after the other.
Each optimiser runs a grid of peak learning rates (3 each by default: the same trial
budget; ``--adamw-rates`` / ``--soap-rates`` move a grid), each with a linear warmup (5 %) and
cosine decay to 0 over the steps that fit the budget (from its measured step time):

* ``adamw``: ``optax.adamw`` (optax's defaults otherwise), rates ``transformer_lm.RATES``;
* ``soap``: ``curvax.soap`` (the authors' defaults otherwise: β = (0.95, 0.95),
  preconditioner refresh every 10 steps, weight decay 0.01), rates ``SOAP_RATES``.

The target is the best final validation loss over AdamW's grid; reported per run: the
seconds (and updates) to first reach it, the best of each grid, and the ratio AdamW's best
seconds ÷ SOAP's best seconds (> 1: SOAP is faster). Since the measured clock of a run
depends on what else the machine is doing, the step times are also measured interleaved
(``benchmarks.timing.median_times``) and the ratio recomputed as updates to target ×
interleaved step time. With several ``--seeds`` (each its own initialisation and batch
stream, its own target: AdamW's best on that seed) the comparison is repeated per seed and
the median of the per-seed ratios reported. Writes
``benchmarks/results/soap_vs_adamw.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np
import optax

import curvax
from benchmarks import transformer_lm as lm
from benchmarks.timing import median_times
from curvax.problems import training

SOAP_RATES = (1e-3, 3e-3, 1e-2)


def soap(rate: float, steps: int) -> optax.GradientTransformation:
  """``curvax.soap`` with :func:`benchmarks.transformer_lm.adamw`'s schedule."""
  steps = max(int(steps), 2)
  return curvax.soap(optax.warmup_cosine_decay_schedule(
      0.0, rate, warmup_steps=max(1, int(lm.WARMUP * steps)), decay_steps=steps))


OPTIMISERS = {"adamw": (lm.adamw, lm.RATES), "soap": (soap, SOAP_RATES)}


def _first_step(prob, make, seed):
  params = prob.model.init(jax.random.PRNGKey(seed), prob.validation[0][:1])
  tx = make(1e-3, 100)
  step = training.make_step(prob.model, tx, lm.LOSS, second_order=False)
  state, (x, y) = tx.init(params), prob.batch(seed, 0)
  # From SOAP's second state on: its first call only builds the bases.
  params, state, _ = step(params, state, x, y)
  return lambda: step(params, state, x, y)


def step_seconds(prob, seed: int, repeats: int) -> dict:
  """Median step times of both optimisers, measured interleaved."""
  return median_times({name: _first_step(prob, make, seed)
                       for name, (make, _) in OPTIMISERS.items()}, repeats=repeats)


def run(*, budget: float, small: bool, seed: int = 0, repeats: int = 9,
        rates: dict | None = None) -> dict:
  """Every optimiser at every rate of its grid (``rates``: name → rates, default the
  module's grids)."""
  prob = lm.problem(small)
  seconds = step_seconds(prob, seed, repeats)
  curves = {}
  for name, (make, default_rates) in OPTIMISERS.items():
    for rate in (rates or {}).get(name, default_rates):
      planned = max(int(budget / seconds[name]), 2)
      record = lm.run_one(prob, make(rate, planned), second_order=False, budget=budget,
                          seed=seed, eval_every=budget / 30)
      record.update(optimiser=name, learning_rate=rate, scheduled_steps=planned)
      curves[f"{name}@{rate:g}"] = record
      print(f"{name}@{rate:g}: {record['step'][-1]} updates, final validation loss "
            f"{record['validation_loss'][-1]:.4f}", flush=True)
  return {"step_seconds": seconds, "curves": curves}


def summarise(result: dict) -> dict:
  curves, seconds = result["curves"], result["step_seconds"]
  finals = {k: r["validation_loss"][-1] for k, r in curves.items()}
  target = min(v for k, v in finals.items() if k.startswith("adamw@"))
  rows = {}
  for key, record in curves.items():
    updates = lm.first_reaching(record, target, "step")
    rows[key] = {
        "final_validation_loss": round(finals[key], 4), "updates": record["step"][-1],
        "seconds_per_update": round(record["seconds"][-1] / max(record["step"][-1], 1), 4),
        "updates_to_target": updates,
        "seconds_to_target": lm.first_reaching(record, target, "seconds"),
        "interleaved_seconds_to_target": (
            None if updates is None else updates * seconds[record["optimiser"]])}
  best = {}
  for name in OPTIMISERS:
    for clock in ("seconds_to_target", "interleaved_seconds_to_target"):
      times = [row[clock] for key, row in rows.items()
               if key.startswith(name + "@") and row[clock] is not None]
      best.setdefault(name, {})[clock] = min(times) if times else None
  ratios = {clock: (None if best["soap"][clock] is None
                    else round(best["adamw"][clock] / best["soap"][clock], 2))
            for clock in ("seconds_to_target", "interleaved_seconds_to_target")}
  return {"target_validation_loss": round(target, 4),
          "step_seconds": {k: round(v, 4) for k, v in seconds.items()},
          "soap_step / adamw_step": round(seconds["soap"] / seconds["adamw"], 2),
          "runs": rows, "best": best, "adamw_seconds / soap_seconds": ratios}


def markdown(summary: dict) -> str:
  fmt = lambda v: "never" if v is None else f"{v:.1f}"
  lines = [f"Target: AdamW's best final validation loss "
           f"{summary['target_validation_loss']:.3f} nats/byte; step time SOAP ÷ AdamW "
           f"{summary['soap_step / adamw_step']} (interleaved)", "",
           "| run | updates | final val. loss | updates to target | s to target "
           "(measured) | s to target (interleaved) |", "|---|---|---|---|---|---|"]
  for key, row in summary["runs"].items():
    lines.append(f"| {key} | {row['updates']} | {row['final_validation_loss']:.3f} | "
                 f"{row['updates_to_target'] or 'never'} | "
                 f"{fmt(row['seconds_to_target'])} | "
                 f"{fmt(row['interleaved_seconds_to_target'])} |")
  ratio = summary["adamw_seconds / soap_seconds"]
  lines += ["", f"AdamW's best seconds ÷ SOAP's best: {ratio['seconds_to_target']} "
            f"(measured), {ratio['interleaved_seconds_to_target']} (interleaved)"]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", type=float, default=60.0,
                      help="seconds of training per run (one per rate of each grid)")
  parser.add_argument("--small", action="store_true", help="a tiny model (smoke runs)")
  for name, (_, default_rates) in OPTIMISERS.items():
    parser.add_argument(f"--{name}-rates", default=",".join(f"{r:g}" for r in default_rates),
                        help=f"{name}'s grid of peak learning rates, comma-separated")
  parser.add_argument("--seeds", default="0",
                      help="comma-separated seeds (initialisation and batch stream)")
  parser.add_argument("--out", default=str(lm.RESULTS / "soap_vs_adamw.json"))
  args = parser.parse_args(argv)
  grids = {name: tuple(float(r) for r in getattr(args, f"{name}_rates").split(","))
           for name in OPTIMISERS}
  seeds = [int(seed) for seed in args.seeds.split(",")]
  header = {"command": "python -m benchmarks.soap_vs_adamw " + " ".join(argv or []),
            "budget_seconds": args.budget, "small": args.small,
            "backend": jax.default_backend(), "device": str(jax.devices()[0])}
  per_seed = {}
  for seed in seeds:
    result = run(budget=args.budget, small=args.small, seed=seed, rates=grids)
    per_seed[seed] = {"summary": summarise(result), **result}
    print(f"seed {seed}:", markdown(per_seed[seed]["summary"]), sep="\n", flush=True)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if len(seeds) == 1:  # the single-seed layout of the earlier records
    record = {**header, **per_seed[seeds[0]]}
  else:
    record = {**header, "seeds": seeds,
              "median_adamw_seconds / soap_seconds": _median_ratios(per_seed),
              "per_seed": per_seed}
    print("median over seeds:", record["median_adamw_seconds / soap_seconds"])
  out.write_text(json.dumps(record, indent=1, default=float))


def _median_ratios(per_seed: dict) -> dict:
  """Per clock, the median over seeds of AdamW's best seconds ÷ SOAP's best (a seed on
  which SOAP never reached the target counts as a ratio of 0)."""
  clocks = ("seconds_to_target", "interleaved_seconds_to_target")
  return {clock: float(np.median([
      entry["summary"]["adamw_seconds / soap_seconds"][clock] or 0.0
      for entry in per_seed.values()])) for clock in clocks}


if __name__ == "__main__":
  import sys
  main(sys.argv[1:])
