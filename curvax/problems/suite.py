"""The shipped training problems and a wall-clock-budgeted runner.

Shared by ``make demo`` (:mod:`curvax.demo`) and the benchmarks
(``benchmarks/time_to_loss.py``, ``benchmarks/defaults.py``), so the demo shows the
very problem and timing rules the recorded benchmark figures come from.

* ``autoencoder`` — the paper-scale deep autoencoder 784-1000-500-250-30-250-500-1000-784
  (sigmoid, Bernoulli BCE summed over pixels; kfra_kflr.md §5), 20 000 training images,
  batch 1000;
* ``mlp`` — CurveBall's MNIST classifier 784-1000-500-250-10 (tanh), 30 000 images,
  batch 128;
* ``cnn`` — the basic CNN of curveball.md §5.2, 10 000 images, batch 128.

The loss is tracked on a fixed probe of 5 000 training images (2 000 for the CNN).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvax import losses
from curvax.problems import datasets, models, training

PROBLEMS = ("autoencoder", "mlp", "cnn")


class Problem(NamedTuple):
  model: Callable
  loss: losses.Loss
  train: datasets.Dataset
  probe: datasets.Dataset
  batch_size: int
  autoencoder: bool
  activation: Any  # the network's elementwise function(s) between layers, for KFRA


def problem(name: str, *, scale: float = 1.0) -> Problem:
  """A problem of the module docstring; ``scale`` < 1 shrinks the data (tests, smoke runs)."""
  size = lambda n: max(int(n * scale), 1)
  if name == "autoencoder":
    data = datasets.subset(datasets.load_mnist("train"), size(20000))
    return Problem(models.Autoencoder(), losses.sigmoid_binary_cross_entropy(), data,
                   datasets.subset(data, size(5000)), size(1000), True,
                   # sigmoid after every hidden layer but the linear 30-unit code
                   [jax.nn.sigmoid] * 3 + [None] + [jax.nn.sigmoid] * 3)
  if name == "mlp":
    data = datasets.subset(datasets.load_mnist("train"), size(30000))
    return Problem(models.MLP(features=(1000, 500, 250, 10)),
                   losses.softmax_cross_entropy(), data,
                   datasets.subset(data, size(5000)), size(128), False, jnp.tanh)
  if name == "cnn":
    data = datasets.subset(datasets.load_mnist("train", flatten=False), size(10000))
    return Problem(models.BasicCNN(num_classes=10), losses.softmax_cross_entropy(),
                   # ReLU throughout; KFRA refuses the network (not a Dense chain)
                   data, datasets.subset(data, size(2000)), size(128), False, jax.nn.relu)
  raise ValueError(f"unknown problem {name!r}; expected one of {', '.join(PROBLEMS)}")


def stream(prob: Problem, seed: int) -> Iterator[tuple[jax.Array, jax.Array]]:
  """Endless ``(inputs, targets)`` batches, epoch after epoch, in an order from ``seed``."""
  epoch = 0
  while True:
    for x, y in datasets.batches(prob.train, prob.batch_size,
                                 jax.random.PRNGKey(1000 * seed + epoch)):
      yield x, (x if prob.autoencoder else y)
    epoch += 1


class Run:
  """One optimiser on one problem, advanced in wall-clock slices.

  Compilation happens in the constructor and is timed apart (``compile_seconds``); the
  clock counts only the jitted steps, not the probe evaluations. Every optimiser built
  with the same ``seed`` starts from the same parameters and sees the same batches.

  Args:
    prob: the problem.
    tx: the optimiser.
    second_order: ``tx`` is a curvax solver (see :func:`training.make_step`).
    seed: the initialisation and batch order.
  """

  def __init__(self, prob: Problem, tx: optax.GradientTransformation, *,
               second_order: bool, seed: int = 0):
    self.params = prob.model.init(jax.random.PRNGKey(seed), prob.train.inputs[:1])
    probe_targets = prob.probe.inputs if prob.autoencoder else prob.probe.labels
    self._probe = jax.jit(lambda p: prob.loss.value(prob.model.apply(p, prob.probe.inputs),
                                                    probe_targets))
    self._batches = stream(prob, seed)
    self.state = tx.init(self.params)
    self._batch = next(self._batches)
    step = training.make_step(prob.model, tx, prob.loss, second_order=second_order)
    start = time.perf_counter()
    self._step = step.lower(self.params, self.state, *self._batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.seconds, self.steps = 0.0, 0
    self.record = {"step": [0], "seconds": [0.0], "loss": [self.probe_loss()],
                   "compile_seconds": self.compile_seconds}

  def probe_loss(self) -> float:
    return float(self._probe(self.params))

  def advance(self, until: float = float("inf"), *, steps: float = float("inf")) -> float:
    """Steps until the clock reaches ``until`` seconds or the step count reaches
    ``steps``, whichever comes first; records and returns the probe loss."""
    while self.seconds < until and self.steps < steps:
      start = time.perf_counter()
      self.params, self.state, _ = jax.block_until_ready(
          self._step(self.params, self.state, *self._batch))
      self.seconds += time.perf_counter() - start
      self.steps += 1
      self._batch = next(self._batches)
    value = self.probe_loss()
    for key, entry in (("step", self.steps), ("seconds", self.seconds), ("loss", value)):
      self.record[key].append(entry)
    return value
