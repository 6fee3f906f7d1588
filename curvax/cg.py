"""Preconditioned conjugate gradient on pytrees, jittable, with Martens' stopping rule.

Solves ``A x = b`` for a symmetric positive-definite operator ``A`` given as a
matrix-vector product on pytrees, starting from ``x0`` (Hessian-free's warm start),
inside one ``jax.lax.while_loop``. It minimises the quadratic ``φ(x) = ½xᵀAx − bᵀx``
and stops at the first of

* ``max_iters`` iterations,
* Martens' relative-progress rule (Martens 2010, §4.4): after ``i ≥ min_iters`` steps,
  with ``k = max(min_iters, ⌈progress_window·i⌉)``, stop when
  ``φ(x_i) < 0`` and ``(φ(x_i) − φ(x_{i−k})) / φ(x_i) < k·tol``,
* a residual below ``atol`` (the exact solution of a small problem), or
* a non-positive curvature ``pᵀAp ≤ 0`` (the operator is not PD along ``p``).

For CG backtracking, the iterates at ``i = ⌈γ^j⌉`` (``γ = 1.3``, Martens 2010 §4.6)
are kept — the most recent ``num_saved`` of them — with the final iterate always last.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class CGResult(NamedTuple):
  """Outcome of :func:`conjugate_gradient`.

  Attributes:
    x: the final iterate.
    iterations: CG steps taken (a step refused for non-positive curvature is not
      counted).
    objective: ``φ(x)`` of the final iterate.
    saved: pytree with a leading axis of ``num_saved`` saved iterates, oldest first; the
      last entry is the final iterate.
    num_saved: how many entries of ``saved`` are valid (they are the last ones).
  """
  x: PyTree
  iterations: jax.Array
  objective: jax.Array
  saved: PyTree
  num_saved: jax.Array


def backtracking_schedule(max_iters: int, growth: float = 1.3) -> tuple[int, ...]:
  """Iterations ``⌈γ^j⌉`` at which iterates are saved for backtracking."""
  points, j = set(), 0
  while math.ceil(growth ** j) <= max_iters:
    points.add(math.ceil(growth ** j))
    j += 1
  return tuple(sorted(points))


def conjugate_gradient(matvec: Callable[[PyTree], PyTree], b: PyTree, x0: PyTree, *,
                       max_iters: int = 50, min_iters: int = 10, tol: float = 5e-4,
                       progress_window: float = 0.1, atol: float = 0.0,
                       preconditioner: Optional[Callable[[PyTree], PyTree]] = None,
                       num_saved: int = 1) -> CGResult:
  """Preconditioned CG for ``A x = b`` from ``x0`` (see the module docstring)."""
  if max_iters < 1:
    raise ValueError(f"max_iters must be >= 1, got {max_iters}.")
  if num_saved < 1:
    raise ValueError(f"num_saved must be >= 1, got {num_saved}.")
  precondition = preconditioner or (lambda r: r)
  vdot = optax.tree.vdot
  dtype = jnp.result_type(*jax.tree.leaves(b))
  schedule = jnp.asarray(backtracking_schedule(max_iters), jnp.int32)

  def objective(x, r):  # φ(x) = ½xᵀAx − bᵀx = −½ xᵀ(r + b), with r = b − Ax
    return -0.5 * vdot(x, optax.tree.add(r, b))

  r0 = optax.tree.sub(b, matvec(x0))
  y0 = precondition(r0)
  history0 = jnp.zeros((max_iters + 1,), dtype).at[0].set(objective(x0, r0))
  saved0 = jax.tree.map(lambda a: jnp.zeros((num_saved,) + a.shape, a.dtype), x0)

  class Carry(NamedTuple):
    i: jax.Array
    x: PyTree
    r: PyTree
    y: PyTree
    p: PyTree
    ry: jax.Array
    history: jax.Array
    saved: PyTree       # ring buffer: save number n lives in slot n % num_saved
    writes: jax.Array   # saves so far
    saved_at: jax.Array  # iteration of the latest save (-1: none)
    stop: jax.Array

  def save(saved, writes, saved_at, x, i):
    slot = writes % num_saved
    saved = jax.tree.map(lambda s, a: jax.lax.dynamic_update_index_in_dim(s, a, slot, 0),
                         saved, x)
    return saved, writes + 1, i

  def skip(saved, writes, saved_at, x, i):
    return saved, writes, saved_at

  def body(c: Carry) -> Carry:
    ap = matvec(c.p)
    curvature = vdot(c.p, ap)
    # A direction of non-positive curvature ends the solve without taking its step:
    # α = 0 leaves x and r exactly as they were, and the step is neither counted nor
    # saved.
    bad = curvature <= 0
    alpha = jnp.where(bad, 0.0, c.ry / jnp.where(bad, 1.0, curvature))
    x = optax.tree.add_scale(c.x, alpha, c.p)
    r = optax.tree.add_scale(c.r, -alpha, ap)
    y = precondition(r)
    ry = vdot(r, y)
    p = optax.tree.add_scale(y, ry / jnp.where(c.ry != 0, c.ry, 1.0), c.p)
    i = jnp.where(bad, c.i, c.i + 1)
    phi = objective(x, r)
    history = c.history.at[i].set(phi)
    k = jnp.maximum(min_iters, jnp.ceil(progress_window * i).astype(jnp.int32))
    previous = history[jnp.maximum(i - k, 0)]
    slow = (i >= min_iters) & (i > k) & (phi < 0) & ((phi - previous) / phi < k * tol)
    small = jnp.sqrt(jnp.abs(ry)) <= atol
    saved, writes, saved_at = jax.lax.cond(jnp.any(schedule == i) & ~bad, save, skip,
                                           c.saved, c.writes, c.saved_at, x, i)
    return Carry(i, x, r, y, p, ry, history, saved, writes, saved_at,
                 bad | slow | small | (i >= max_iters))

  zero = jnp.zeros((), jnp.int32)
  init = Carry(zero, x0, r0, y0, y0, vdot(r0, y0), history0, saved0, zero, zero - 1,
               jnp.sqrt(jnp.abs(vdot(r0, y0))) <= atol)
  final = jax.lax.while_loop(lambda c: ~c.stop, body, init)
  # The final iterate is always the last saved entry.
  saved, writes, _ = jax.lax.cond(final.saved_at == final.i, skip, save, final.saved,
                                  final.writes, final.saved_at, final.x, final.i)
  # Oldest first, the valid entries last: rotate the ring buffer once.
  shift = (num_saved - writes % num_saved) % num_saved
  saved = jax.tree.map(lambda s: jnp.roll(s, shift, axis=0), saved)
  count = jnp.minimum(writes, num_saved)
  return CGResult(final.x, final.i, final.history[final.i], saved, count)
