"""The shipped training problems and a wall-clock-budgeted runner.

Shared by ``make demo`` (:mod:`curvax.demo`) and the benchmarks
(``benchmarks/time_to_loss.py``, ``benchmarks/defaults.py``), so the demo shows the
very problem and timing rules the recorded benchmark figures come from.

* ``autoencoder`` — the paper-scale deep autoencoder 784-1000-500-250-30-250-500-1000-784
  (sigmoid, Bernoulli BCE summed over pixels; kfra_kflr.md §5), 20 000 training images,
  batch 1000;
* ``mlp`` — CurveBall's MNIST classifier 784-1000-500-250-10 (tanh), 30 000 images,
  batch 128;
* ``cnn`` — the basic CNN of curveball.md §5.2, 10 000 images, batch 128;
* ``char_lm`` — a byte-level causal transformer (2 blocks, width 128, context 128) on
  the training files of the standard library's source (:mod:`curvax.problems.text`),
  batches of 32 random windows (not in :data:`PROBLEMS`: the MNIST set stays the default).

The loss is tracked on a fixed probe of 5 000 training images (2 000 for the CNN).
:func:`heldout` gives data never trained on: the last 10 000 MNIST training images
(every problem trains on a prefix of at most 30 000), MNIST's test set, and windows of
the held-out standard-library files.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvax import losses
from curvax.problems import datasets, models, text, training

PROBLEMS = ("autoencoder", "mlp", "cnn")
# The last images of MNIST's training split are held out: no problem trains on them.
_HELDOUT = 10000
_MNIST_TRAIN = 60000


class Problem(NamedTuple):
  model: Callable
  loss: losses.Loss
  train: datasets.Dataset
  probe: datasets.Dataset
  batch_size: int
  autoencoder: bool
  activation: Any  # the network's elementwise function(s) between layers, for KFRA
  # > 0: ``train.inputs`` is one token stream and a batch is ``batch_size`` random
  # windows of ``context`` tokens (``char_lm``); 0: a batch is ``batch_size`` examples.
  context: int = 0


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
  if name == "char_lm":
    corpus = text.load_stdlib()
    tokens = datasets.Dataset(corpus.train, corpus.train, text.VOCAB_SIZE)
    # scale < 1: the tiny model of the smoke runs, not fewer bytes (windows are random).
    width, heads, blocks, context, batch = ((128, 4, 2, 128, 32) if scale >= 1
                                            else (32, 2, 1, 32, 8))
    model = models.Transformer(vocab_size=text.VOCAB_SIZE, width=width, num_heads=heads,
                               num_blocks=blocks, context=context)
    probe = heldout_windows(corpus.train, 64, context, seed=54321)
    return Problem(model, losses.softmax_cross_entropy(), tokens, probe, batch, False,
                   None, context)
  raise ValueError(f"unknown problem {name!r}; expected one of {', '.join(PROBLEMS)}")


_windows = jax.jit(text.windows, static_argnums=(2, 3))


def heldout_windows(tokens: jax.Array, count: int, context: int, *,
                    seed: int = 12345) -> datasets.Dataset:
  """``count`` fixed windows of ``tokens``: inputs and next-token targets as a Dataset."""
  inputs, targets = _windows(tokens, jax.random.PRNGKey(seed), count, context)
  return datasets.Dataset(inputs, targets, text.VOCAB_SIZE)


def heldout(name: str, split: str = "validation", *, scale: float = 1.0
            ) -> datasets.Dataset:
  """Data ``name`` never trains on, for validation (``split="validation"``) or test.

  MNIST problems: validation is the last 5 000 training images (2 000 for the CNN),
  inside the last 10 000 that no problem's training prefix reaches; test is the first
  as many images of MNIST's test split. Not all 10 000: evaluating them is off the
  training clock but not off the wall clock (~1 s per autoencoder evaluation on 2
  cores). ``char_lm``: 512 windows (64 for ``scale`` < 1) of the held-out files; it
  has no test split.
  """
  size = lambda n: max(int(n * scale), 1)
  if name == "char_lm":
    if split != "validation":
      raise ValueError("char_lm has only a validation split")
    prob = problem(name, scale=scale)
    return heldout_windows(text.load_stdlib().validation, 512 if scale >= 1 else 64,
                           prob.context)
  if name not in PROBLEMS:
    raise ValueError(f"unknown problem {name!r}")
  count = size(2000 if name == "cnn" else _HELDOUT // 2)
  if split == "validation":
    data = datasets.load_mnist("train", flatten=name != "cnn")
    return datasets.subset(data, count, start=_MNIST_TRAIN - count)
  if split == "test":
    return datasets.subset(datasets.load_mnist("test", flatten=name != "cnn"), count)
  raise ValueError(f"split must be 'validation' or 'test', got {split!r}")


def stream(prob: Problem, seed: int) -> Iterator[tuple[jax.Array, jax.Array]]:
  """Endless ``(inputs, targets)`` batches, epoch after epoch, in an order from ``seed``
  (for a token stream: random windows drawn from ``seed`` and the step)."""
  if prob.context:
    key, step = jax.random.PRNGKey(seed), 0
    while True:
      yield _windows(prob.train.inputs, jax.random.fold_in(key, step), prob.batch_size,
                     prob.context)
      step += 1
  epoch = 0
  while True:
    for x, y in datasets.batches(prob.train, prob.batch_size,
                                 jax.random.PRNGKey(1000 * seed + epoch)):
      yield x, (x if prob.autoencoder else y)
    epoch += 1


class Run:
  """One optimiser on one problem, advanced in wall-clock slices.

  Compilation happens in the constructor and is timed apart (``compile_seconds``); the
  clock counts only the jitted steps, not the evaluations. Every optimiser built
  with the same ``seed`` starts from the same parameters and sees the same batches.

  Args:
    prob: the problem (its ``batch_size`` is the run's: ``prob._replace(batch_size=b)``).
    tx: the optimiser.
    second_order: ``tx`` is a curvax solver (see :func:`training.make_step`).
    seed: the initialisation and batch order.
    evaluate: ``params -> float`` recorded at every :meth:`advance` under ``metric``;
      default: the loss on the problem's probe.
    metric: the record's key for ``evaluate``'s values.
  """

  def __init__(self, prob: Problem, tx: optax.GradientTransformation, *,
               second_order: bool, seed: int = 0,
               evaluate: Callable[[Any], Any] | None = None, metric: str = "loss"):
    self._batches = stream(prob, seed)
    self._batch = next(self._batches)
    self.params = prob.model.init(jax.random.PRNGKey(seed), self._batch[0][:1])
    if evaluate is None:
      probe_targets = prob.probe.inputs if prob.autoencoder else prob.probe.labels
      evaluate = jax.jit(lambda p: prob.loss.value(
          prob.model.apply(p, prob.probe.inputs), probe_targets))
    self._evaluate, self._metric = evaluate, metric
    self.state = tx.init(self.params)
    step = training.make_step(prob.model, tx, prob.loss, second_order=second_order)
    start = time.perf_counter()
    self._step = step.lower(self.params, self.state, *self._batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.seconds, self.steps = 0.0, 0
    self.record = {"step": [0], "seconds": [0.0], metric: [self.probe_loss()],
                   "compile_seconds": self.compile_seconds}

  def probe_loss(self) -> float:
    """The evaluation (by default the probe loss) at the current parameters."""
    return float(self._evaluate(self.params))

  def advance(self, until: float = float("inf"), *, steps: float = float("inf")) -> float:
    """Steps until the clock reaches ``until`` seconds or the step count reaches
    ``steps``, whichever comes first; records and returns the evaluation."""
    while self.seconds < until and self.steps < steps:
      start = time.perf_counter()
      self.params, self.state, _ = jax.block_until_ready(
          self._step(self.params, self.state, *self._batch))
      self.seconds += time.perf_counter() - start
      self.steps += 1
      self._batch = next(self._batches)
    value = self.probe_loss()
    for key, entry in (("step", self.steps), ("seconds", self.seconds),
                       (self._metric, value)):
      self.record[key].append(entry)
    return value
