"""CurveBall's classifier experiments (curveball.md §4.2, §4.5), scaled to 2 CPU cores.

    python -m benchmarks.curveball_classifiers [--models mlp,cnn]

The paper's MLP (784-1000-500-250-10, tanh) and basic CNN (5×5 convs 32-32-64-64-10,
3×3 max-pool stride 2 after the first three) on MNIST — CIFAR-10 ships in no registry
package, so MNIST stands in. CurveBall (λ₀ = 1, see
``curvax.problems.training.classifier_optimisers``) vs Adam (1e-3) vs SGD + momentum (0.9;
learning rate 0.1 for the MLP, 0.01 for the CNN, where 0.1 diverges) on identical
batches. Every ``eval_every`` steps the loss and error on a fixed training subset are recorded against the step count and the optimiser's own
wall-clock (evaluation and compilation excluded). Reports the wall-clock each method needs
to reach Adam's final training loss (CurveBall's target: ≤ 0.7× Adam's).
Writes ``benchmarks/results/curveball_classifiers.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp

import curvax
from curvax.problems import datasets, models, training

RESULTS = pathlib.Path(__file__).parent / "results"


def _evaluator(model, loss, data):
  @jax.jit
  def evaluate(params):
    logits = model.apply(params, data.inputs)
    error = jnp.mean(jnp.argmax(logits, -1) != data.labels)
    return loss.value(logits, data.labels), error
  return evaluate


def train_curves(model, train, probe, *, epochs, batch_size, eval_every, sgd_learning_rate,
                 seed=0):
  """Loss/error on ``probe`` vs steps and wall-clock, for every optimiser."""
  loss = curvax.losses.softmax_cross_entropy()
  params0 = model.init(jax.random.PRNGKey(seed), train.inputs[:1])
  evaluate = _evaluator(model, loss, probe)
  curves = {}
  optimisers = training.classifier_optimisers(loss, sgd_learning_rate=sgd_learning_rate)
  for name, tx in optimisers.items():
    step = training.make_step(model, tx, loss, second_order=name == "curveball")
    params, opt_state = params0, tx.init(params0)
    warm = step(params, opt_state, train.inputs[:batch_size], train.labels[:batch_size])
    jax.block_until_ready(warm)  # compile outside the clock
    record = {"step": [], "seconds": [], "loss": [], "error": []}
    clock, count = 0.0, 0
    for epoch in range(epochs):
      for x, y in datasets.batches(train, batch_size, jax.random.PRNGKey(100 + epoch)):
        start = time.perf_counter()
        params, opt_state, _ = jax.block_until_ready(step(params, opt_state, x, y))
        clock += time.perf_counter() - start
        count += 1
        if count % eval_every == 0:
          value, error = evaluate(params)
          for key, item in (("step", count), ("seconds", clock), ("loss", float(value)),
                            ("error", float(error))):
            record[key].append(item)
    curves[name] = record
  return curves


def time_to_reach(curves, reference="adam"):
  """Wall-clock each method needs to reach ``reference``'s final loss (None: never)."""
  target = curves[reference]["loss"][-1]
  result = {}
  for name, record in curves.items():
    hits = [s for s, v in zip(record["seconds"], record["loss"]) if v <= target]
    result[name] = hits[0] if hits else None
  base = result[reference]
  return {name: {"seconds": s, "ratio_to_" + reference: (s / base if s and base else None)}
          for name, s in result.items()}


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(results), 3, figsize=(13, 3.6 * len(results)), squeeze=False)
  for row, (model_name, curves) in zip(axes, results.items()):
    for name, record in curves.items():
      row[0].plot(record["step"], record["loss"], label=name)
      row[1].plot(record["seconds"], record["loss"], label=name)
      row[2].plot(record["step"], record["error"], label=name)
    row[0].set(title=f"{model_name}: training loss vs steps", yscale="log", xlabel="step")
    row[1].set(title="training loss vs wall-clock", yscale="log", xlabel="seconds")
    row[2].set(title="training error vs steps", yscale="log", xlabel="step")
    row[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def run(model_names=("mlp", "cnn"), *, small=False):
  train_all = datasets.load_mnist("train", flatten=True)
  settings = {
      "mlp": dict(model=models.MLP(features=(1000, 500, 250, 10)), flatten=True,
                  size=2048 if small else 30000, epochs=1 if small else 2, batch=128,
                  sgd_learning_rate=0.1),
      "cnn": dict(model=models.BasicCNN(num_classes=10), flatten=False,
                  size=512 if small else 6000, epochs=1 if small else 2, batch=128,
                  sgd_learning_rate=0.01),
  }
  results, summary = {}, {}
  for name in model_names:
    cfg = settings[name]
    data = datasets.subset(train_all, cfg["size"])
    if not cfg["flatten"]:
      data = data._replace(inputs=data.inputs.reshape(-1, 28, 28, 1))
    probe = datasets.subset(data, min(2048, cfg["size"]))
    curves = train_curves(cfg["model"], data, probe, epochs=cfg["epochs"],
                          batch_size=cfg["batch"], eval_every=4 if small else 10,
                          sgd_learning_rate=cfg["sgd_learning_rate"])
    results[name] = curves
    summary[name] = time_to_reach(curves)
    print(json.dumps({"model": name, "time_to_adam_final_loss": summary[name],
                      "final_loss": {k: v["loss"][-1] for k, v in curves.items()}}),
          flush=True)
  return results, summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--small", action="store_true")
  args = parser.parse_args()
  results, summary = run(tuple(args.models.split(",")), small=args.small)
  RESULTS.mkdir(exist_ok=True)
  (RESULTS / "curveball_classifiers.json").write_text(
      json.dumps({"curves": results, "time_to_adam_final_loss": summary}, indent=1))
  plot(results, RESULTS / "curveball_classifiers.png")


if __name__ == "__main__":
  main()
