"""The comparison paper's MNIST/LeNet experiment (second_order_comparison.md), scaled to CPU.

    python -m benchmarks.comparison [--quick] [--activation relu] [--budget SECONDS]

LeNet (tanh; 20 and 50 5×5 filters, a 500-unit dense layer) on a subset of the shipped
MNIST. SGD (fixed step) against the paper's three second-order methods, each with and
without the Armijo backtracking line search of the paper's eq. (2) (``slope_rtol=0.1``,
value and gradient on the step's batch), at two batch sizes:

* ``shg`` — Hessian-free (Martens 2010) with a Stochastic Hessian: the gradient, the loss
  of CG backtracking and of the Levenberg-Marquardt rule, and the line search use the
  step's batch; the GGN products use a sub-batch of 20% of it
  (``hessian_free(curvature_batch=True)``). (The paper's SHG takes its gradient over 20%
  of the whole training set; on two CPU cores that leaves SHG one or two steps per run.)
* ``sqn`` — stochastic L-BFGS with curvature pairs from GGN products at averaged
  iterates every 10 steps (Byrd et al. 2016).
* ``lsr1`` — limited-memory SR1 with GGN-product pairs and the SR1 skipping rule.

Without the line search each second-order method takes a fixed learning rate (the
paper's §4.4 ablation); Hessian-free keeps its own damping and refuses steps that raise
the batch loss. Each run trains for ``--budget`` seconds of optimiser wall-clock
(evaluation and compilation excluded); the test accuracy on a held-out subset is recorded
against that clock. The table is the paper's Table 2: seconds to reach the target test
accuracy (at two targets). Writes ``benchmarks/results/comparison.{json,png}``
(``comparison_relu.*`` with ``--activation relu``).

On XLA:CPU, convolutions inside control flow run several times slower than at top level
(jax-ml/jax#12868): each CG iteration of Hessian-free on LeNet costs about five gradient
evaluations instead of about one, which inflates SHG's times here (not on GPU/TPU).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import curvax
from curvax.problems import datasets, models, training

RESULTS = pathlib.Path(__file__).parent / "results"
LOSS = curvax.losses.softmax_cross_entropy()


class Config(NamedTuple):
  """Sizes of one comparison run."""
  train_size: int = 3000
  test_size: int = 1000
  batch_sizes: tuple = (100, 500)
  budget: float = 20.0           # optimiser seconds per run
  targets: tuple = (0.9, 0.95)   # test accuracies of the time-to-accuracy table
  shg_fraction: float = 0.2      # share of SHG's batch its curvature products use
  eval_interval: float = 1.0     # optimiser seconds between evaluations
  max_epochs: int = 100
  activation: str = "tanh"
  seed: int = 0


# Fixed steps, from a coarse sweep over 1, 0.3, 0.1, 0.03 (tanh LeNet, batch 100): the
# best value that did not diverge within the budget (1 diverges for all three methods,
# 0.3 for SGD and SQN). Hessian-free's step is its damped Newton step (learning rate 1).
LEARNING_RATES = {"sgd": 0.1, "shg": 1.0, "sqn": 0.1, "lsr1": 0.1}
SHG_CG_ITERS = 10


def optimiser(method: str, *, line_search: bool) -> optax.GradientTransformationExtraArgs:
  """The transform of one method; with ``line_search`` chained with optax's Armijo search."""
  lr = LEARNING_RATES[method]
  if method == "sgd":
    return optax.sgd(lr)
  if method == "shg":
    base = curvax.hessian_free(LOSS, learning_rate=1.0 if line_search else lr,
                               curvature_batch=True, max_cg_iters=SHG_CG_ITERS,
                               min_cg_iters=3, damping=1.0)
  elif method == "sqn":
    # The paper's method: the Armijo search (or a fixed rate) on p = −Hg itself.
    base = curvax.sqn(LOSS, learning_rate=1.0 if line_search else lr, step_size="fixed",
                      memory=10, pair_period=10)
  elif method == "lsr1":
    base = curvax.lsr1(LOSS, learning_rate=1.0 if line_search else lr, step_size="fixed",
                       memory=10)
  else:
    raise ValueError(f"unknown method {method!r}")
  if not line_search:
    return base
  return optax.chain(base, line_search_transform())


def line_search_transform() -> optax.GradientTransformationExtraArgs:
  """The paper's backtracking search (eq. 2): halve from the unit step until Armijo holds.

  ``increase_factor`` large: every search starts from the unit step (optax's default
  would start from 1.5× the last accepted step, so one hard batch slows the next
  twenty). ``rtol=1e-6`` absorbs rounding: when a solver refuses a step (Hessian-free
  does when its step raises the batch loss) the update is zero, the slope is zero, and
  the condition compares two float32 evaluations of the same loss.
  """
  return optax.scale_by_backtracking_linesearch(
      max_backtracking_steps=15, slope_rtol=0.1, decrease_factor=0.5,
      increase_factor=1e6, rtol=1e-6)


def _value_fn(params, predict_fn=None, targets=None, curvature_predict_fn=None,
              curvature_targets=None):
  """The line search's objective on the step's batch.

  ``optax.chain`` forwards every extra argument to the line search, which passes on to
  ``value_fn`` the ones it does not use itself: SHG's ``curvature_*`` batch included.
  """
  del curvature_predict_fn, curvature_targets
  return LOSS.value(predict_fn(params), targets)


def make_step(model, method: str, tx, *, line_search: bool):
  """Jitted ``(params, state, x, y, cx, cy) -> (params, state, loss)``.

  ``(x, y)`` is the step's batch (SHG: its gradient chunk); ``(cx, cy)`` SHG's curvature
  mini-batch, ignored by the other methods.
  """
  @jax.jit
  def step(params, state, x, y, cx, cy):
    predict = lambda p: model.apply(p, x)
    extra = {}
    if method == "shg":
      extra = dict(curvature_predict_fn=lambda p: model.apply(p, cx), curvature_targets=cy)
    if method == "sgd":  # the baseline: the step a user writes with optax's own loss
      params, state, _ = training.first_order_update(
          tx, training.optax_objective(LOSS), params, state, predict, y)
      return params, state
    if line_search:
      value, grad = jax.value_and_grad(lambda p: LOSS.value(predict(p), y))(params)
      updates, state = tx.update(grad, state, params, value=value, grad=grad,
                                 value_fn=_value_fn, predict_fn=predict, targets=y, **extra)
    else:  # the solver's own linearisation gives the gradient
      updates, state = tx.update(None, state, params, predict_fn=predict, targets=y,
                                 **extra)
    return optax.apply_updates(params, updates), state

  return step


def _batches(method, data, batch_size, shg_fraction, key):
  """One epoch of ``(x, y, cx, cy)``; ``(cx, cy)``: SHG's curvature sub-batch."""
  sub = max(1, int(round(shg_fraction * batch_size))) if method == "shg" else 1
  for x, y in datasets.batches(data, batch_size, key):
    yield x, y, x[:sub], y[:sub]


def _evaluator(model, train_probe, test):
  @jax.jit
  def evaluate(params):
    train_loss = LOSS.value(model.apply(params, train_probe.inputs), train_probe.labels)
    accuracy = jnp.mean(jnp.argmax(model.apply(params, test.inputs), -1) == test.labels)
    return train_loss, accuracy
  return evaluate


def train(model, method, line_search, train_data, evaluate, params0, batch_size,
          config: Config) -> dict:
  """Train one method until its optimiser clock reaches ``config.budget``."""
  tx = optimiser(method, line_search=line_search)
  step = make_step(model, method, tx, line_search=line_search)
  params, state = params0, tx.init(params0)
  first = next(_batches(method, train_data, batch_size, config.shg_fraction,
                        jax.random.PRNGKey(0)))
  # Compile outside the clock. Twice: optax's line-search state starts with a weakly
  # typed counter, so the second call traces once more.
  warm = step(params, state, *first)
  jax.block_until_ready(step(*warm, *first))
  record = {"seconds": [0.0], "steps": [0], "examples": [0], "train_loss": [],
            "test_accuracy": []}
  loss, accuracy = evaluate(params)
  record["train_loss"].append(float(loss))
  record["test_accuracy"].append(float(accuracy))
  clock, last_eval, examples, steps = 0.0, 0.0, 0, 0
  for epoch in range(config.max_epochs):
    key = jax.random.PRNGKey(1000 * config.seed + epoch)
    for x, y, cx, cy in _batches(method, train_data, batch_size, config.shg_fraction, key):
      start = time.perf_counter()
      params, state = jax.block_until_ready(step(params, state, x, y, cx, cy))
      clock += time.perf_counter() - start
      examples += x.shape[0]
      steps += 1
      if clock - last_eval >= config.eval_interval or clock >= config.budget:
        last_eval = clock
        loss, accuracy = evaluate(params)
        for name, value in (("seconds", clock), ("steps", steps), ("examples", examples),
                            ("train_loss", float(loss)), ("test_accuracy", float(accuracy))):
          record[name].append(value)
        if clock >= config.budget or not np.isfinite(float(loss)):
          return record
  return record


def time_to_accuracy(record, target):
  """Optimiser seconds until the test accuracy first reaches ``target`` (None: never)."""
  for seconds, accuracy in zip(record["seconds"], record["test_accuracy"]):
    if accuracy >= target:
      return seconds
  return None


def loss_after_steps(record, steps):
  """Training loss at the last evaluation within the first ``steps`` steps."""
  values = [v for s, v in zip(record["steps"], record["train_loss"]) if s <= steps]
  return values[-1]


def per_step_table(results) -> str:
  """Markdown: training loss after the same number of steps at every batch size."""
  batches = list(results)
  lines = ["| method | steps | " + " | ".join(f"batch {b}: loss" for b in batches) + " |",
           "|---" * (2 + len(batches)) + "|"]
  for label in results[batches[0]]:
    steps = min(results[b][label]["steps"][-1] for b in batches)
    losses = [f"{loss_after_steps(results[b][label], steps):.3f}" for b in batches]
    lines.append(f"| {label} | {steps} | " + " | ".join(losses) + " |")
  return "\n".join(lines)


def labels():
  """Method labels in table order: SGD, then each second-order method without/with LS."""
  out = ["sgd"]
  for method in ("shg", "sqn", "lsr1"):
    out += [method, method + "+ls"]
  return out


def run(config: Config = Config(), *, methods=None, model=None, verbose=True):
  """Every method at every batch size; returns ``{batch: {label: record}}``."""
  activation = {"tanh": jnp.tanh, "relu": nn.relu}[config.activation]
  model = model or models.LeNet(activation=activation)
  flatten = isinstance(model, models.MLP)
  train_all = datasets.load_mnist("train", flatten=flatten)
  test_all = datasets.load_mnist("test", flatten=flatten)
  train_data = datasets.subset(train_all, config.train_size)
  test = datasets.subset(test_all, config.test_size)
  probe = datasets.subset(train_data, min(1000, config.train_size))
  evaluate = _evaluator(model, probe, test)
  params0 = model.init(jax.random.PRNGKey(config.seed), train_data.inputs[:1])
  results = {}
  for batch_size in config.batch_sizes:
    results[batch_size] = {}
    for label in methods or labels():
      method, line_search = label.split("+")[0], label.endswith("+ls")
      start = time.perf_counter()
      record = train(model, method, line_search, train_data, evaluate, params0, batch_size,
                     config)
      results[batch_size][label] = record
      if verbose:
        print(json.dumps({
            "batch": batch_size, "method": label,
            "seconds_to": {t: time_to_accuracy(record, t) for t in config.targets},
            "final_test_accuracy": record["test_accuracy"][-1],
            "final_train_loss": record["train_loss"][-1], "steps": record["steps"][-1],
            "epochs": round(record["examples"][-1] / config.train_size, 2),
            "wall": round(time.perf_counter() - start, 1)}), flush=True)
  return results


def table(results, targets) -> str:
  """Markdown: seconds to each target test accuracy (the paper's Table 2 form)."""
  batches = list(results)
  columns = [(b, t) for b in batches for t in targets]
  head = ("| method | " + " | ".join(f"batch {b}: s to {t:.0%}" for b, t in columns)
          + " | " + " | ".join(f"batch {b}: final acc." for b in batches) + " |")
  lines = [head, "|---" * (1 + len(columns) + len(batches)) + "|"]
  for label in results[batches[0]]:
    times = []
    for b, t in columns:
      seconds = time_to_accuracy(results[b][label], t)
      times.append("—" if seconds is None else f"{seconds:.1f}")
    finals = [f"{results[b][label]['test_accuracy'][-1]:.3f}" for b in batches]
    lines.append(f"| {label} | " + " | ".join(times + finals) + " |")
  return "\n".join(lines)


def plot(results, path, title=""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  batches = list(results)
  fig, axes = plt.subplots(len(batches), 3, figsize=(16, 3.8 * len(batches)),
                           squeeze=False)
  for row, b in zip(axes, batches):
    for label, record in results[b].items():
      style = "--" if label.endswith("+ls") else "-"
      row[0].plot(record["seconds"], record["train_loss"], style, label=label)
      row[1].plot(record["steps"], record["train_loss"], style, label=label)
      row[2].plot(record["seconds"], record["test_accuracy"], style, label=label)
    row[0].set(title=f"{title} batch {b}: training loss", xlabel="optimiser seconds",
               yscale="log")
    row[1].set(title=f"batch {b}: training loss per step", xlabel="steps", xscale="symlog",
               yscale="log")
    row[2].set(title=f"batch {b}: test accuracy", xlabel="optimiser seconds",
               ylim=(0.5, 1.0))
    row[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smaller data and budget (about 4 minutes)")
  parser.add_argument("--activation", choices=("tanh", "relu"), default="tanh")
  parser.add_argument("--budget", type=float, help="optimiser seconds per run")
  parser.add_argument("--targets", help="comma-separated test accuracies, e.g. 0.9,0.95")
  parser.add_argument("--batch-sizes", help="comma-separated, e.g. 100,500")
  args = parser.parse_args()
  config = Config(activation=args.activation)
  if args.quick:
    config = config._replace(train_size=2000, test_size=1000, budget=8.0,
                             targets=(0.85, 0.9))
  if args.budget:
    config = config._replace(budget=args.budget)
  if args.targets:
    config = config._replace(targets=tuple(float(t) for t in args.targets.split(",")))
  if args.batch_sizes:
    config = config._replace(batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
  results = run(config)
  markdown = table(results, config.targets)
  per_step = per_step_table(results)
  print(markdown)
  print()
  print(per_step)
  RESULTS.mkdir(exist_ok=True)
  stem = "comparison" if config.activation == "tanh" else f"comparison_{config.activation}"
  (RESULTS / f"{stem}.json").write_text(json.dumps(
      {"config": config._asdict(), "table": markdown, "per_step_table": per_step,
       "seconds_to": {b: {k: {t: time_to_accuracy(r, t) for t in config.targets}
                          for k, r in rs.items()} for b, rs in results.items()},
       "curves": {str(b): rs for b, rs in results.items()}}, indent=1))
  plot(results, RESULTS / f"{stem}.png", title=f"LeNet ({config.activation})")


if __name__ == "__main__":
  main()
