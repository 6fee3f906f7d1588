"""EKFAC's initial damping γ, chosen by progress per update on the shipped problems.

    python -m benchmarks.ekfac_defaults [--problems autoencoder,mlp,cnn,transformer] [--steps 60]
                                        [--gammas 3e-4,3e-3,3e-2,3e-1]
                                        [--forms exact,factored]
                                        [--inverse-period 5]

EKFAC's damping is exact, ``(S + γ)⁻¹`` in the eigenbasis, where KFAC's factored damping
adds ``π√γ`` and ``√γ/π`` to the factors: the same γ damps EKFAC far less (the
autoencoder stays on its plateau with KFAC's ``γ = 3·10⁻⁴``); ``damping_form="factored"``
adds what KFAC's factored damping adds to ``s_Q ⊗ s_𝒢``. Every run starts from the
same parameters and sees the same batches; reported: the probe loss after ``--steps``
updates per γ, beside KFAC with its defaults. Writes
``benchmarks/results/ekfac_defaults.json`` (rows merged per problem, each with its
command).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from benchmarks import transformer_lm
import curvax
from curvax.problems import suite

RESULTS = pathlib.Path(__file__).parent / "results" / "ekfac_defaults.json"


def _final_loss(name: str, prob, tx, steps: int) -> dict:
  """The probe loss after ``steps`` updates (the validation loss for the transformer)."""
  if name == "transformer":
    record = transformer_lm.run_one(prob, tx, second_order=True, max_steps=steps, seed=0,
                                    eval_every=np.inf)
    return {"probe_loss": record["validation_loss"][-1]}
  run = suite.Run(prob, tx, second_order=True)
  run.advance(steps=steps)
  return {"probe_loss": run.record["loss"][-1], "num_skipped": int(run.state.num_skipped)}


def measure(name: str, steps: int, gammas, forms, inverse_period: int) -> dict:
  if name == "transformer":  # benchmarks.transformer_lm's small model
    prob, loss = transformer_lm.problem(small=True), transformer_lm.LOSS
  else:
    prob = suite.problem(name)
    loss = prob.loss
  rows = {}
  runs = {"kfac (defaults)": curvax.kfac(loss)}
  for form in forms:
    suffix = "" if form == "exact" else f" {form}"
    if inverse_period != 5:
      suffix += f" inverse_period={inverse_period}"
    runs.update({f"ekfac gamma={g:g}{suffix}": curvax.ekfac(
        loss, gamma=g, damping_form=form, inverse_period=inverse_period)
                 for g in gammas})
  for label, tx in runs.items():
    rows[label] = _final_loss(name, prob, tx, steps)
    print(name, label, json.dumps(rows[label]), flush=True)
  return rows


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--problems", default="autoencoder,mlp")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--gammas", default="3e-4,3e-3,3e-2,3e-1")
  parser.add_argument("--forms", default="exact,factored")
  parser.add_argument("--inverse-period", type=int, default=5)
  args = parser.parse_args(argv)
  gammas = [float(g) for g in args.gammas.split(",")]
  evidence = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
  for name in args.problems.split(","):
    command = (f"python -m benchmarks.ekfac_defaults --problems {name} --steps "
               f"{args.steps} --gammas {args.gammas} --forms {args.forms} "
               f"--inverse-period {args.inverse_period}")
    rows = measure(name, args.steps, gammas, args.forms.split(","), args.inverse_period)
    entry = evidence.setdefault(name, {"rows": {}})
    for label, row in rows.items():
      entry["rows"][label] = {**row, "command": command}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(evidence, indent=1))
  return evidence


if __name__ == "__main__":
  main()
