"""Polyak averaging of the parameters for evaluation (kfra_kflr.md App. C.4).

    θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t,    β_t = min(0.95, 1 − 1/t)        (eq. 44–45)

so ``θ̂_t`` is the exact mean of ``θ_1 … θ_t`` while ``t ≤ 20`` and an exponential
average afterwards. The average never affects training: :func:`polyak` returns the
updates unchanged and keeps ``θ̂`` in its state, accumulated in at least float32 (in
bfloat16 the late increments ``(1 − β_t)(θ_t − θ̂_{t−1})`` fall below the rounding of
``θ̂`` and are lost). Put it LAST in an ``optax.chain`` (it
averages ``params + updates``, the parameters after the step) and read the average with
:func:`averaged_params`.

A solver's rollback (:mod:`curvax.nonfinite`) reaches the average late: the step that
landed the parameters where the loss overflows was averaged in (weight ``1 − β_t``)
before the next batch showed it, and the reversal only stops it being averaged again.
The landed point then decays from ``θ̂`` by ``β`` per step (``0.95^t``); when it is far
out (a learning-rate spike), re-initialise the average after a rollback — the solver's
``num_rolled_back`` says when — e.g. ``state = state._replace(average=params, count=0)``
on the ``PolyakState``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from curvax._validation import ScalarOrSchedule, check_fraction, value_at

PyTree = Any


class PolyakState(NamedTuple):
  """State of :func:`polyak`.

  Attributes:
    average: ``θ̂_t`` (the initial parameters before the first step), in at least
      float32.
    count: ``t``, the number of parameter values averaged.
    like: a 0-d zero in each parameter's dtype, the dtypes :func:`averaged_params`
      returns.
  """
  average: PyTree
  count: jax.Array
  like: PyTree


def polyak(max_decay: ScalarOrSchedule = 0.95) -> optax.GradientTransformation:
  """Polyak averaging ``β_t = min(max_decay, 1 − 1/t)`` (eq. 44–45); updates unchanged.

  Args:
    max_decay: the cap on ``β_t`` (the paper's 0.95): a number (NumPy and 0-d JAX
      scalars too, so ``optax.inject_hyperparams(curvax.polyak)`` works) or an
      ``optax.Schedule`` evaluated at the number of steps averaged so far.
  """
  check_fraction("max_decay", max_decay, schedule=True)

  def init_fn(params):
    # A copy even when no widening is needed: astype to the same dtype returns the
    # parameter's own buffer, which a step donating params and state would alias.
    return PolyakState(average=jax.tree.map(lambda p: jnp.array(_wide(p), copy=True),
                                            params),
                       count=jnp.zeros((), jnp.int32),
                       like=jax.tree.map(lambda p: jnp.zeros((), jnp.asarray(p).dtype),
                                         params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("curvax.polyak: params are required to average them: call "
                       "tx.update(updates, state, params).")
    cap = value_at(max_decay, state.count)
    count = state.count + 1
    new_params = optax.apply_updates(params, updates)

    def mix(avg, new):
      t = count.astype(avg.dtype)
      beta = jnp.minimum(jnp.asarray(cap, avg.dtype), 1 - 1 / t)
      return beta * avg + (1 - beta) * new.astype(avg.dtype)

    average = jax.tree.map(mix, state.average, new_params)
    return updates, PolyakState(average=average, count=count, like=state.like)

  return optax.GradientTransformation(init_fn, update_fn)


def averaged_params(state: Any) -> PyTree:
  """The averaged parameters ``θ̂`` from a :class:`PolyakState`, found anywhere inside an
  optimiser state (e.g. an ``optax.chain``'s tuple), in the parameters' dtypes.

  Raises:
    ValueError: when the state holds no ``PolyakState`` or more than one.
  """
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PolyakState))
           if isinstance(s, PolyakState)]
  if len(found) != 1:
    raise ValueError(f"averaged_params: expected exactly one curvax.polyak state inside "
                     f"the optimiser state, found {len(found)}.")
  return jax.tree.map(lambda a, p: a.astype(p.dtype), found[0].average, found[0].like)


def _wide(p) -> jax.Array:
  p = jnp.asarray(p)
  return p.astype(jnp.promote_types(p.dtype, jnp.float32))
