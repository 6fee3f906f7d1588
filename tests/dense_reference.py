"""Dense references for the solver tests, built without curvax's products or solvers.

Everything here works on flattened parameters with ``jax.jacobian`` / ``jax.hessian``,
optax's own losses and numpy: the curvature matrices of a tiny model, and a textbook
(preconditioned) conjugate gradient that records every iterate.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels (optax's, not curvax's)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def squared_error(outputs, targets):
  """Mean over the batch of ``‖o − t‖²`` summed over the other axes."""
  return jnp.mean(jnp.sum((outputs - targets) ** 2, axis=tuple(range(1, outputs.ndim))))


class TinyMLP(NamedTuple):
  """A 3-4-3 tanh MLP with softmax cross-entropy on a random batch."""
  params: dict
  x: jax.Array
  y: jax.Array

  @staticmethod
  def predict(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

  def predict_fn(self, x=None):
    x = self.x if x is None else x
    return lambda p: TinyMLP.predict(p, x)


def tiny_mlp(dtype=jnp.float64, *, batch: int = 8, seed: int = 0, inputs: int = 3,
             hidden: int = 4, classes: int = 3, scale: float = 1.0) -> TinyMLP:
  """Parameters (``inputs·hidden + hidden + hidden·classes + classes`` of them) and data."""
  k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(seed), 5)
  params = {"w1": scale * jax.random.normal(k1, (inputs, hidden), dtype),
            "b1": 0.1 * jax.random.normal(k2, (hidden,), dtype),
            "w2": scale * jax.random.normal(k3, (hidden, classes), dtype),
            "b2": jnp.zeros((classes,), dtype)}
  x = jax.random.normal(k4, (batch, inputs), dtype)
  y = jax.random.randint(k5, (batch,), 0, classes)
  return TinyMLP(params, x, y)


def flat(tree) -> np.ndarray:
  return np.asarray(ravel_pytree(tree)[0])


class Dense(NamedTuple):
  """Loss, gradient, GGN and Hessian of ``loss_fn(predict(w), targets)`` at ``w``."""
  value: float
  grad: np.ndarray
  ggn: np.ndarray
  hessian: np.ndarray


def _matrices(predict, params, targets, loss_fn):
  w, unravel = ravel_pytree(params)
  net = lambda v: predict(unravel(v))
  objective = lambda v: loss_fn(net(v), targets)
  outputs = net(w)
  jacobian = jax.jacobian(lambda v: net(v).reshape(-1))(w)
  output_hessian = jax.hessian(lambda o: loss_fn(o.reshape(outputs.shape), targets))(
      outputs.reshape(-1))
  return (objective(w), jax.grad(objective)(w), jacobian.T @ output_hessian @ jacobian,
          jax.hessian(objective)(w))


def _as_dense(arrays) -> Dense:
  value, grad, ggn, hessian = arrays
  return Dense(float(value), np.asarray(grad), np.asarray(ggn), np.asarray(hessian))


def dense(predict, params, targets, loss_fn=cross_entropy) -> Dense:
  """Dense matrices on flattened parameters (``ravel_pytree`` order).

  Jitted: eager ``jax.hessian`` dispatches (and compiles) hundreds of small operations,
  which is far slower on CPU.
  """
  return _as_dense(jax.jit(lambda p, t: _matrices(predict, p, t, loss_fn))(params, targets))


def dense_ggn(predict, params, targets, loss_fn=cross_entropy) -> tuple[np.ndarray, np.ndarray]:
  """``(Jᵀ H_L J, ∇f)`` on flattened parameters: :func:`dense` without the full Hessian
  (the expensive part for models with a few hundred parameters)."""
  w, unravel = ravel_pytree(params)

  @jax.jit
  def matrices(w):
    net = lambda v: predict(unravel(v)).reshape(-1)
    shape = jax.eval_shape(lambda: predict(unravel(w))).shape
    on_outputs = lambda o: loss_fn(o.reshape(shape), targets)
    jacobian = jax.jacobian(net)(w)
    outputs = net(w)
    return (jacobian.T @ jax.hessian(on_outputs)(outputs) @ jacobian,
            jacobian.T @ jax.grad(on_outputs)(outputs))

  return tuple(np.asarray(m) for m in matrices(w))


@jax.jit
def _mlp_matrices(params, x, y):
  return _matrices(lambda p: TinyMLP.predict(p, x), params, y, cross_entropy)


def mlp_dense(params, x, y) -> Dense:
  """:func:`dense` for :class:`TinyMLP` with cross-entropy (compiled once per shape)."""
  return _as_dense(_mlp_matrices(params, x, y))


_loss_values = jax.jit(lambda params, x, y: cross_entropy(TinyMLP.predict(params, x), y))


def mlp_loss(params, x, y) -> float:
  return float(_loss_values(params, x, y))


def loss_at(predict, params, targets, loss_fn=cross_entropy) -> float:
  return float(loss_fn(predict(params), targets))


class CGTrace(NamedTuple):
  """Iterates ``x_0 … x_m`` of textbook CG and ``φ(x_i) = ½xᵀAx − bᵀx``.

  ``negative_curvature`` says whether the run ended at a direction with ``pᵀAp ≤ 0``
  (whose step was not taken).
  """
  iterates: list
  objectives: list
  negative_curvature: bool


def conjugate_gradient(a, b, x0=None, *, iters: int, m_inv=None) -> CGTrace:
  """Preconditioned CG (Nocedal & Wright Alg. 5.3) in numpy, ``iters`` steps at most.

  ``m_inv`` is the matrix of the preconditioner's inverse (``r ↦ M⁻¹ r``).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  x = np.zeros_like(b) if x0 is None else np.asarray(x0, np.float64).copy()
  m_inv = np.eye(b.size) if m_inv is None else np.asarray(m_inv, np.float64)
  phi = lambda v: 0.5 * v @ a @ v - b @ v
  r = b - a @ x
  y = m_inv @ r
  p = y.copy()
  iterates, objectives = [x.copy()], [phi(x)]
  for _ in range(iters):
    ap = a @ p
    curvature = p @ ap
    if curvature <= 0:
      return CGTrace(iterates, objectives, True)
    alpha = (r @ y) / curvature
    x = x + alpha * p
    r_new = r - alpha * ap
    y_new = m_inv @ r_new
    beta = (r_new @ y_new) / (r @ y)
    p = y_new + beta * p
    r, y = r_new, y_new
    iterates.append(x.copy())
    objectives.append(phi(x))
  return CGTrace(iterates, objectives, False)


def spd_matrix(n: int, eigenvalues, seed: int = 0) -> np.ndarray:
  """``Q diag(eigenvalues) Qᵀ`` with a random orthogonal ``Q``."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.asarray(eigenvalues, np.float64)) @ q.T


def tiny_mlp_stepper(tx, *, curvature_batch: bool = False):
  """Jitted ``step(params, state, x, y, cx=None, cy=None, grad=None) -> (updates, state)``
  for :class:`TinyMLP`, with the SHG curvature batch ``(cx, cy)`` when asked for."""
  def step(params, state, x, y, cx=None, cy=None, grad=None):
    extra = {}
    if curvature_batch:
      extra = dict(curvature_predict_fn=lambda p: TinyMLP.predict(p, cx),
                   curvature_targets=cy)
    return tx.update(grad, state, params, predict_fn=lambda p: TinyMLP.predict(p, x),
                     targets=y, **extra)
  return jax.jit(step)


def assert_batch_skipped(new_params, updates, new_state, params, state):
  """A non-finite batch: zero updates, parameters and every state field unchanged,
  ``num_skipped`` incremented by one."""
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  for got, kept in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(kept))
  assert int(new_state.num_skipped) == int(state.num_skipped) + 1
  for name in state._fields:
    if name != "num_skipped":
      for got, kept in zip(jax.tree.leaves(getattr(new_state, name)),
                           jax.tree.leaves(getattr(state, name))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(kept), err_msg=name)
