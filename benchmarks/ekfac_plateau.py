"""KFAC and EKFAC with their defaults on the deep autoencoder's plateau, over seeds.

    python -m benchmarks.ekfac_plateau [--steps 150] [--every 30] [--seeds 0,1,2]
                                       [--problem autoencoder]

The MNIST deep autoencoder of :mod:`curvax.problems.suite` (batch 1000) starts on a
plateau at the mean image (probe loss ≈ 206); when a run leaves it depends on the seed
(initialisation and batch order). Each seed trains ``curvax.kfac(loss)`` and
``curvax.ekfac(loss)`` from the same parameters over the same batches; the probe loss is
recorded every ``--every`` updates. Issue 24's goal is EKFAC's progress per update at
least KFAC's; medians over seeds are compared. ``--problem`` runs the same comparison on
another shipped problem (``cnn``, ``mlp``). Writes
``benchmarks/results/ekfac_plateau.json`` (``ekfac_plateau_<problem>.json`` for another
problem).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import curvax
from curvax.problems import suite

RESULTS = pathlib.Path(__file__).parent / "results" / "ekfac_plateau.json"
SOLVERS = {"kfac": curvax.kfac, "ekfac": curvax.ekfac}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--every", type=int, default=30)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--problem", default="autoencoder")
  args = parser.parse_args(argv)
  prob = suite.problem(args.problem)
  curves = {}
  for seed in (int(s) for s in args.seeds.split(",")):
    for name, make in SOLVERS.items():
      run = suite.Run(prob, make(prob.loss), second_order=True, seed=seed)
      for k in range(args.every, args.steps + 1, args.every):
        run.advance(steps=k)
      curves[f"{name}/seed{seed}"] = {key: run.record[key]
                                      for key in ("step", "loss", "seconds")}
      print(name, seed, [round(v, 1) for v in run.record["loss"]], flush=True)
  finals = {name: [c["loss"][-1] for key, c in curves.items() if key.startswith(name + "/")]
            for name in SOLVERS}
  summary = {name: {"final_probe_loss": values, "median": statistics.median(values)}
             for name, values in finals.items()}
  out = (RESULTS if args.problem == "autoencoder"
         else RESULTS.with_name(f"ekfac_plateau_{args.problem}.json"))
  out.write_text(json.dumps({
      "command": "python -m benchmarks.ekfac_plateau " + " ".join(argv or []),
      "steps": args.steps, "summary": summary, "curves": curves}, indent=1))
  print(json.dumps(summary))


if __name__ == "__main__":
  import sys
  main(sys.argv[1:])
