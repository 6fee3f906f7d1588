"""Skipping batches with non-finite losses or products, as ``optax.apply_if_finite`` does.

A solver computes its candidate step and state, then :func:`guard` keeps them only if
every checked value is finite; otherwise the update is zero and the old state is kept,
with its ``num_skipped`` counter incremented. Solver states therefore carry a
``num_skipped`` field.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def all_finite(*trees: Any) -> jax.Array:
  """Whether every leaf of every tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def guard(finite: jax.Array, step: Any, new_state: Any, old_state: Any, *,
          unguarded: tuple[str, ...] = ()):
  """``(step, new_state)`` if ``finite``, else ``(0, old_state + 1 skipped)``.

  Fields named in ``unguarded`` are taken from ``new_state`` either way: the solver
  has made them safe to keep itself (a select over large buffers is a full pass over
  memory).
  """
  kept = {name: getattr(new_state, name) for name in unguarded}
  cleared = {name: None for name in unguarded}
  skipped = old_state._replace(num_skipped=old_state.num_skipped + 1, **cleared)
  state = optax.tree.where(finite, new_state._replace(**cleared), skipped)
  return optax.tree.where(finite, step, optax.tree.zeros_like(step)), state._replace(**kept)
