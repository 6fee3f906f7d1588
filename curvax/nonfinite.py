"""Non-finite batches: skipped, as ``optax.apply_if_finite`` does, or the landing undone.

A solver computes its candidate step and state, then :func:`guard` keeps them only if
every checked value is finite. Otherwise one of two things happens:

* **rollback** — the batch is not finite at the current parameters (its loss,
  gradient, curvature products or step), but its loss and loss gradient before the
  solver's last update are (:func:`rollback_due`): that update landed the parameters where the loss overflows (a spiked learning rate, a model step
  the batch's quadratic model misjudged). The step returned is the reverse of that
  update, the state is the solver's own "rejected step" state (damping raised, momentum
  cleared) with its record of the last update cleared, and ``num_rolled_back`` grows by
  one. A batch can roll back at most one update: right after a rollback the record is
  zero, so a second consecutive non-finite batch is skipped;
* **skip** — anything else (a non-finite batch: not finite before the last update
  either; a non-finite gradient passed in by the user): the update is zero and the old
  state is kept, with its ``num_skipped`` counter incremented.

Solver states therefore carry ``num_skipped`` and, when they roll back,
``num_rolled_back`` and a record of the last update applied (``last_update``, a
params-shaped tree in the parameters' dtypes, zero at ``init``; a solver whose update is
a scalar times a tree it keeps anyway may record just the scalar, as CurveBall does).

How a solver uses it (the Kronecker solvers adopt the same three calls)::

  due = nonfinite.rollback_due(finite, params, state.last_update, lin.loss_at)
  undo = nonfinite.Rollback(
      due=due, step=nonfinite.reverse(state.last_update),
      state=state._replace(damping=raised, last_update=zeros_like(state.last_update)))
  new_state = new_state._replace(last_update=step)   # what this step applies
  return nonfinite.guard(finite, step, new_state, state, rollback=undo)

The reversal restores the parameters up to rounding, ``ε·|u|`` per entry for an update
``u`` (``params + u − u`` in the parameters' dtype): exact enough when the landing is a
few orders of magnitude out (a ×1e5 learning-rate spike on a ReLU network whose squared
error then overflows: ``tests/test_nonfinite.py``), but an update 1e12 times the
parameters' size leaves nothing of them in float32, and no additive update can bring
them back.

Only the solver's own output is reversed. In an ``optax.chain`` the transforms after the
solver see the reversal as an ordinary update: a constant scaling (``optax.scale``),
clipping by norm and sign-symmetric transforms reverse exactly, but a schedule outside
the solver (``optax.scale_by_schedule``) scales the reversal by a different factor and
undoes the landing only in part — put schedules in the solver's own ``learning_rate``.
:func:`curvax.polyak` last in the chain has already averaged the landed parameters in
once (weight ``1 − β_t``); see its docstring.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def all_finite(*trees: Any) -> jax.Array:
  """Whether every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class Rollback(NamedTuple):
  """What :func:`guard` returns when a non-finite batch undoes the last update.

  Attributes:
    due: scalar bool, from :func:`rollback_due`.
    step: the update returned then: the reverse of the last update applied
      (:func:`reverse`).
    state: the solver's state then — the OLD state with the damping raised as for a
      rejected step and the record of the last update cleared (zero), so that the next
      non-finite batch cannot roll back again. :func:`guard` adds one to its
      ``num_rolled_back``.
  """
  due: jax.Array
  step: PyTree
  state: Any


def rollback_due(finite: jax.Array, params: PyTree,
                 last_update: "PyTree | Callable[[], PyTree]",
                 loss_at: Callable[[PyTree], jax.Array], *,
                 given_gradient: Optional[PyTree] = None) -> jax.Array:
  """Whether this batch undoes the last update: it is not ``finite``, but its loss and
  loss gradient at ``params − last_update`` are.

  ``finite`` is the solver's whole check (loss, gradient, products, step), not the loss
  alone: a landing often leaves the loss and even its gradient finite (1e29 for a ReLU
  network's squared error) while the curvature products or the next step overflow. The
  loss and gradient before the update tell a landing from a non-finite batch (NaN
  targets; inf inputs, whose loss a saturating network keeps finite while every
  gradient through the first layer is NaN), which is non-finite at both points and is
  skipped. They cost a forward and a backward pass, on non-finite batches only
  (``lax.cond``). A zero ``last_update`` (at ``init``, after a refused step or a
  rollback) never rolls back.

  Args:
    finite: whether the batch's values at ``params`` are all finite.
    params: the current parameters.
    last_update: the last update the solver applied (a params-shaped tree), or a
      function returning it — called on non-finite batches only, so a solver that
      rebuilds it (CurveBall: a scalar times ``z``) pays nothing on the others.
    loss_at: ``params -> loss`` on this batch (:meth:`curvax.Linearization.loss_at`).
    given_gradient: the gradient the user passed as ``updates``, if any: when it is not
      finite the batch is skipped, never rolled back — the solver cannot tell the
      user's gradient from a landing (whose own gradient overflowed).
  """
  def before(_):
    update = last_update() if callable(last_update) else last_update
    previous = jax.tree.map(lambda p, u: p - u.astype(p.dtype), params, update)
    value, grad = jax.value_and_grad(loss_at)(previous)
    return any_nonzero(update) & all_finite(value, grad)

  if given_gradient is not None:
    finite = finite | ~all_finite(given_gradient)
  return jax.lax.cond(finite, lambda _: jnp.asarray(False), before, None)


def any_nonzero(tree: PyTree) -> jax.Array:
  """Whether some leaf of ``tree`` has a non-zero entry."""
  leaves = [jnp.any(x != 0) for x in jax.tree.leaves(tree)]
  return jnp.any(jnp.stack(leaves)) if leaves else jnp.asarray(False)


def reverse(update: PyTree) -> PyTree:
  """``−update``: the step that undoes ``update``."""
  return jax.tree.map(jnp.negative, update)


def guard(finite: jax.Array, step: Any, new_state: Any, old_state: Any, *,
          unguarded: tuple[str, ...] = (), rollback: Optional[Rollback] = None):
  """``(step, new_state)`` if ``finite``; else a rollback if due; else a skip.

  * ``finite``: ``(step, new_state)``;
  * not ``finite`` and ``rollback.due``: ``(rollback.step, rollback.state)`` with
    ``num_rolled_back + 1``;
  * otherwise: ``(0, old_state)`` with ``num_skipped + 1``.

  Fields named in ``unguarded`` are taken from ``new_state`` either way: the solver
  has made them safe to keep itself (a select over large buffers is a full pass over
  memory).

  Args:
    finite: whether the batch's loss, gradient and products are all finite.
    step, new_state: the solver's candidate update and state.
    old_state: the state the step started from.
    unguarded: fields ``new_state`` keeps in every case.
    rollback: ``None`` (never roll back: a non-finite batch is skipped) or a
      :class:`Rollback`; the states then need a ``num_rolled_back`` field.
  """
  kept = {name: getattr(new_state, name) for name in unguarded}
  cleared = {name: None for name in unguarded}
  otherwise = old_state._replace(num_skipped=old_state.num_skipped + 1, **cleared)
  zero = optax.tree.zeros_like(step)
  if rollback is not None:
    undone = rollback.state._replace(
        num_rolled_back=rollback.state.num_rolled_back + 1, **cleared)
    otherwise = optax.tree.where(rollback.due, undone, otherwise)
    zero = optax.tree.where(rollback.due, rollback.step, zero)
  state = optax.tree.where(finite, new_state._replace(**cleared), otherwise)
  return optax.tree.where(finite, step, zero), state._replace(**kept)
