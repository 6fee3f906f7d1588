"""The training step and optimiser set shared by ``curvax.demo`` and ``benchmarks/``."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

import curvax


def classifier_optimisers(loss, *, sgd_learning_rate: float = 0.1
                          ) -> dict[str, optax.GradientTransformation]:
  """CurveBall against Adam and SGD + momentum on the MNIST classifiers.

  λ₀ = 1 rather than the paper's 10: on these models γ stays within [1/2, 3/2], so the
  §3.4 rule never moves λ and λ₀ decides; λ₀ = 10 trails λ₀ = 1 (MLP, 460 steps: loss
  0.27 vs 0.15) and λ₀ <= 0.03 is unstable.
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
  otherwise an optax transformation fed ``jax.value_and_grad`` of the loss.
  """
  @jax.jit
  def step(params, state, x, y):
    predict = lambda p: model.apply(p, x)
    if second_order:
      updates, state = tx.update(None, state, params, predict_fn=predict, targets=y)
      value = getattr(state, "loss", jnp.nan)
    else:
      value, grads = jax.value_and_grad(lambda p: loss.value(predict(p), y))(params)
      updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  return step
