"""The training step and optimiser set shared by ``curvax.demo`` and ``benchmarks/``.

The first-order step here is the baseline every benchmark compares against: the step a
user writes with optax alone (``jax.value_and_grad`` of optax's own loss, the optax
optimiser, ``optax.apply_updates``), never one built on curvax's losses.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

import curvax


def _batch_mean(per_element: jax.Array) -> jax.Array:
  """curvax's reduction: summed over every axis but the batch axis 0, mean over the batch."""
  return jnp.sum(per_element) / per_element.shape[0]


def _softmax_cross_entropy(outputs, targets):
  if jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
    return _batch_mean(optax.softmax_cross_entropy_with_integer_labels(outputs, targets))
  return _batch_mean(optax.softmax_cross_entropy(outputs, targets))


_OPTAX_OBJECTIVES = {
    "softmax_cross_entropy": _softmax_cross_entropy,
    "sigmoid_binary_cross_entropy":
        lambda o, t: _batch_mean(optax.sigmoid_binary_cross_entropy(o, t)),
    "squared_error": lambda o, t: _batch_mean(optax.squared_error(o, t)),
}


def optax_objective(loss: curvax.losses.Loss) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``(outputs, targets) -> scalar`` written with optax's own loss, equal to ``loss.value``.

  The batch reduction is curvax's (sum over the non-batch axes, mean over the batch), so
  the baseline optimises the same objective as the solver it is compared with. A loss
  optax does not have (``curvax.losses.from_fn``) falls back to ``loss.value``.
  """
  return _OPTAX_OBJECTIVES.get(loss.name, loss.value)


def first_order_update(tx: optax.GradientTransformation, objective, params, state,
                       predict: Callable, targets):
  """The optax step a user writes: ``(params, state, value)`` after one update.

  Args:
    tx: an optax (first-order) transformation fed the gradient.
    objective: ``(outputs, targets) -> scalar``, e.g. :func:`optax_objective`.
    params, state: the parameters and ``tx``'s state.
    predict: ``params -> outputs`` on the step's batch.
    targets: the batch's targets.
  """
  value, grads = jax.value_and_grad(lambda p: objective(predict(p), targets))(params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, value


def classifier_optimisers(loss, *, sgd_learning_rate: float = 0.1
                          ) -> dict[str, optax.GradientTransformation]:
  """CurveBall against Adam and SGD + momentum on the MNIST classifiers.

  λ₀ = 1 rather than the paper's 10: the authors' §3.4 rule moves λ by at most 0.999⁵
  per 5 steps, so in a few hundred steps λ₀ decides. On the MNIST MLP (460 steps, batch
  128, 30k images) λ falls from 10 to 6.4 and the training loss ends at 0.221; from
  λ₀ = 1 it ends at 0.123 (λ 0.995). λ₀ <= 0.03 is unstable.
  """
  return {
      "curveball": curvax.curveball(loss, damping=1.0),
      "adam": optax.adam(1e-3),
      "sgd+momentum": optax.sgd(sgd_learning_rate, momentum=0.9),
  }


def make_step(model, tx: optax.GradientTransformation, loss, *,
              second_order: bool) -> Callable:
  """A jitted ``(params, state, x, y) -> (params, state, loss)`` for a Flax ``model``.

  ``second_order``: ``tx`` is a curvax solver, called with ``predict_fn``/``targets``
  and no gradient (the loss is the one its state records, where it records one);
  otherwise an optax transformation fed ``jax.value_and_grad`` of optax's own loss
  (:func:`first_order_update` with :func:`optax_objective`).
  """
  objective = optax_objective(loss)

  @jax.jit
  def step(params, state, x, y):
    predict = lambda p: model.apply(p, x)
    if not second_order:
      return first_order_update(tx, objective, params, state, predict, y)
    updates, state = tx.update(None, state, params, predict_fn=predict, targets=y)
    value = getattr(state, "loss", jnp.nan)
    return optax.apply_updates(params, updates), state, value

  return step
