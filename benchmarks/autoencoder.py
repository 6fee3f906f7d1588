"""The deep autoencoder of kfra_kflr.md §5.1, scaled to 2 CPU cores.

    python -m benchmarks.autoencoder [--steps 400] [--hidden 256,128,64,16] [--full-size]

Hinton & Salakhutdinov's MNIST autoencoder D-1000-500-250-30-250-500-1000-D (sigmoid units,
linear code layer, Bernoulli outputs with binary cross-entropy) — by default with the images
2× down-sampled (D = 196) and narrower layers, so that KFLR (one backward pass per output)
fits the time budget; ``--full-size`` runs the paper's widths on 28×28 images. KFAC, KFLR
and KFRA with their defaults (no tuning, the paper's point) against Adam (1e-3, its
default) and SGD + momentum (0.01, 0.9) on identical batches of 250. Every ``eval_every``
updates the training loss on a fixed subset is recorded against the update count and the
optimiser's own wall-clock (evaluation and compilation excluded). Reports the updates and
seconds each method needs to reach Adam's final loss.
Writes ``benchmarks/results/autoencoder.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import optax

import curvax
from curvax import kron
from curvax.problems import datasets, models, training

RESULTS = pathlib.Path(__file__).parent / "results"
SECOND_ORDER = ("kfac", "kflr", "kfra")


def optimisers(loss, model):
  return {
      "kfac": curvax.kfac(loss),
      "kflr": curvax.kflr(loss),
      "kfra": curvax.kfra(loss, activations=kron.chain_activations(model)),
      "adam": optax.adam(1e-3),
      "sgd+momentum": optax.sgd(0.01, momentum=0.9),
  }


def train_curves(model, pixels, probe, *, steps, batch_size, eval_every, names, seed=0):
  loss = curvax.losses.sigmoid_binary_cross_entropy()
  params0 = model.init(jax.random.PRNGKey(seed), pixels[:1])
  evaluate = jax.jit(lambda p: loss.value(model.apply(p, probe), probe))
  curves = {}
  for name, tx in optimisers(loss, model).items():
    if name not in names:
      continue
    step = training.make_step(model, tx, loss, second_order=name in SECOND_ORDER)
    params, opt_state = params0, tx.init(params0)
    first = pixels[:batch_size]
    jax.block_until_ready(step(params, opt_state, first, first))  # compile
    record = {"step": [0], "seconds": [0.0], "loss": [float(evaluate(params))]}
    elapsed = 0.0
    order = jax.random.permutation(jax.random.PRNGKey(seed + 1), pixels.shape[0])
    for i in range(1, steps + 1):
      start_index = ((i - 1) * batch_size) % (pixels.shape[0] - batch_size + 1)
      x = pixels[order[start_index:start_index + batch_size]]
      start = time.perf_counter()
      params, opt_state, _ = jax.block_until_ready(step(params, opt_state, x, x))
      elapsed += time.perf_counter() - start
      if i % eval_every == 0 or i == steps:
        record["step"].append(i)
        record["seconds"].append(elapsed)
        record["loss"].append(float(evaluate(params)))
    curves[name] = record
    print(json.dumps({"name": name, "final_loss": round(record["loss"][-1], 3),
                      "ms_per_update": round(1e3 * elapsed / steps, 2)}), flush=True)
  return curves


def first_reaching(record, target):
  """``(updates, seconds)`` at the first evaluation with loss <= target, or None."""
  for step, seconds, value in zip(record["step"], record["seconds"], record["loss"]):
    if value <= target:
      return step, seconds
  return None


def plot(curves, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  for name, record in curves.items():
    a.plot(record["step"], record["loss"], label=name)
    b.plot(record["seconds"], record["loss"], label=name)
  a.set_xlabel("updates")
  b.set_xlabel("seconds (2 CPU cores, compilation excluded)")
  for ax in (a, b):
    ax.set_ylabel("training loss (BCE per image)")
    ax.set_yscale("log")
    ax.legend()
  fig.suptitle("MNIST deep autoencoder (kfra_kflr.md §5.1)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch-size", type=int, default=250)
  parser.add_argument("--eval-every", type=int, default=10)
  parser.add_argument("--train-size", type=int, default=10000)
  parser.add_argument("--hidden", default="256,128,64,16",
                      help="encoder widths, the last one the code (default scaled down)")
  parser.add_argument("--full-size", action="store_true",
                      help="the paper's 784-1000-500-250-30 network on 28x28 images")
  parser.add_argument("--optimisers", default="kfac,kflr,kfra,adam,sgd+momentum")
  args = parser.parse_args(argv)

  train = datasets.subset(datasets.load_mnist("train"), args.train_size)
  images = train.inputs.reshape(-1, 28, 28)
  if args.full_size:
    hidden = (1000, 500, 250, 30)
  else:
    images = images[:, ::2, ::2]  # 14×14
    hidden = tuple(int(h) for h in args.hidden.split(","))
  pixels = images.reshape(images.shape[0], -1)
  probe = pixels[:2000]
  model = models.Autoencoder(output_dim=pixels.shape[1], hidden=hidden)
  names = args.optimisers.split(",")
  curves = train_curves(model, pixels, probe, steps=args.steps, batch_size=args.batch_size,
                        eval_every=args.eval_every, names=names)

  summary = {}
  target = curves["adam"]["loss"][-1] if "adam" in curves else None
  for name, record in curves.items():
    row = {"final_loss": record["loss"][-1],
           "ms_per_update": 1e3 * record["seconds"][-1] / args.steps}
    if target is not None:
      reached = first_reaching(record, target)
      row["to_adam_final_loss"] = (None if reached is None else
                                   {"updates": reached[0], "seconds": reached[1]})
    summary[name] = row
  RESULTS.mkdir(exist_ok=True)
  config = {"architecture": f"{pixels.shape[1]}-" + "-".join(map(str, hidden)) + "-mirror",
            "steps": args.steps, "batch_size": args.batch_size,
            "train_size": args.train_size, "devices": str(jax.devices()),
            "note": "KFAC/KFLR/KFRA with default settings; Adam 1e-3; SGD 0.01 momentum 0.9. "
                    "Wall-clock is each optimiser's own, on whatever machine ran it: on a "
                    "shared CPU it is noisy (other processes), compare updates first."}
  out = {"config": config, "summary": summary, "curves": curves}
  (RESULTS / "autoencoder.json").write_text(json.dumps(out, indent=1))
  plot(curves, RESULTS / "autoencoder.png")
  print(json.dumps({"summary": summary}, indent=1))


if __name__ == "__main__":
  main()
