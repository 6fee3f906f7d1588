"""KFAC with Cholesky inverses against KFAC in the factors' eigenbases (``inverse=``)
and EKFAC.

    python -m benchmarks.kron_inverse [--problems autoencoder,mlp,cnn] [--steps 60]

For each shipped problem (:mod:`curvax.problems.suite`, its batch size), one process:
an optax Adam step (the cost unit), ``curvax.kfac(loss)`` with ``inverse="cholesky"``
(the default), ``"eigh"`` (the same factored damping in the eigenbases: the γ rule's
candidates reuse one decomposition) and ``"eigh_exact"`` (exact Tikhonov damping), and ``curvax.ekfac(loss)`` (the eigenbasis
with its diagonal re-estimated from per-example gradients).
Every run starts from the same parameters and sees the same batches; they advance in
alternation, ``UNIT`` = 20 steps at a time (one whole γ-rule period: four inverse
refreshes, one γ rule), and the median unit's time per step over Adam's is reported,
with each step's XLA compile time and the probe loss after ``--steps`` steps (progress
per update). Writes ``benchmarks/results/kron_inverse.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import optax

import curvax
from curvax.problems import suite

UNIT = 20
INVERSES = ("cholesky", "eigh", "eigh_exact")
RESULTS = pathlib.Path(__file__).parent / "results"


def measure(name: str, steps: int, inverses=INVERSES, ekfac_variants=({},)) -> dict:
  prob = suite.problem(name)
  runs = {"adam": suite.Run(prob, optax.adam(1e-3), second_order=False)}
  for inverse in inverses:
    runs[f"kfac {inverse}"] = suite.Run(prob, curvax.kfac(prob.loss, inverse=inverse),
                                        second_order=True)
  for kwargs in ekfac_variants:
    label = " ".join(["ekfac", *(f"{k}={v}" for k, v in kwargs.items())])
    runs[label] = suite.Run(prob, curvax.ekfac(prob.loss, **kwargs), second_order=True)
  units = {label: [] for label in runs}
  for done in range(UNIT, steps + 1, UNIT):
    for label, run in runs.items():
      before = run.seconds
      run.advance(steps=done)
      units[label].append((run.seconds - before) / UNIT)
  adam = statistics.median(units["adam"])
  return {label: {"step_over_adam": round(statistics.median(u) / adam, 2),
                  "compile_seconds": round(runs[label].compile_seconds, 2),
                  "probe_loss": runs[label].record["loss"][-1]}
          for label, u in units.items()}


def _arguments(row: str) -> dict:
  """``"inverse_period=20,scale_fraction=0.25"`` → keyword arguments (numbers parsed)."""
  pairs = (item.split("=", 1) for item in row.split(",") if item)
  return {name: json.loads(value) for name, value in pairs}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--problems", default="autoencoder,mlp,cnn")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--inverses", default=",".join(INVERSES),
                      help="the curvax.kfac inverse= rows beside Adam and EKFAC")
  parser.add_argument("--ekfac", default="",
                      help="EKFAC rows with these arguments instead of one with its "
                           "defaults: ';'-separated rows of ','-separated name=value, "
                           "e.g. 'inverse_period=20;scale_fraction=0.25'")
  args = parser.parse_args(argv)
  command = (f"python -m benchmarks.kron_inverse --problems {args.problems} "
             f"--steps {args.steps} --inverses {args.inverses}"
             + (f" --ekfac '{args.ekfac}'" if args.ekfac else ""))
  variants = tuple(_arguments(row) for row in args.ekfac.split(";"))  # "" → ({},)
  path = RESULTS / "kron_inverse.json"
  evidence = (json.loads(path.read_text()) if path.exists()
              else {"unit_steps": UNIT, "results": {}})
  for name in args.problems.split(","):
    rows = measure(name, args.steps, [i for i in args.inverses.split(",") if i], variants)
    # One entry per process: its step ratios compare with each other only.
    evidence["results"].setdefault(name, []).append({"command": command, "rows": rows})
    print(name, json.dumps(rows), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(evidence, indent=1))
  return evidence["results"]


if __name__ == "__main__":
  main()
