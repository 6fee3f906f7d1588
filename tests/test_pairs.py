"""Limited-memory pair store: L-BFGS and SR1 inverse products against dense recursions.

The references build the full ``n × n`` inverse approximation pair by pair from
``H₀ = γI`` (``γ = sᵀy / yᵀy`` of the newest pair), by the textbook update formulas.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curvax import pairs
from tests import dense_reference as ref

N = 7


def _bfgs_inverse(s_list, y_list):
  """``H ← (I − ρsyᵀ) H (I − ρysᵀ) + ρssᵀ``, oldest pair first, from ``H₀ = γI``."""
  if not s_list:
    return np.eye(N)
  s, y = s_list[-1], y_list[-1]
  h = (s @ y) / (y @ y) * np.eye(N)
  for s, y in zip(s_list, y_list):
    rho = 1.0 / (s @ y)
    left = np.eye(N) - rho * np.outer(s, y)
    h = left @ h @ left.T + rho * np.outer(s, s)
  return h


def _sr1_inverse(s_list, y_list):
  """``H ← H + (s − Hy)(s − Hy)ᵀ / ((s − Hy)ᵀ y)``, oldest pair first, from ``H₀ = γI``."""
  if not s_list:
    return np.eye(N)
  s, y = s_list[-1], y_list[-1]
  h = (s @ y) / (y @ y) * np.eye(N)
  for s, y in zip(s_list, y_list):
    residual = s - h @ y
    h = h + np.outer(residual, residual) / (residual @ y)
  return h


def _pairs(count, *, definite=True, shared=True, seed=0):
  """``count`` pairs ``y_i = A_i s_i`` with SPD (or indefinite) ``A_i``.

  ``shared``: one ``A`` for all pairs (then ``SᵀY`` is symmetric); otherwise a new
  matrix per pair, as when curvature is measured at different iterates and batches.
  """
  eigenvalues = np.linspace(0.5, 4.0, N) if definite else np.linspace(-2.0, 3.0, N)
  rng = np.random.default_rng(seed)
  s_list, y_list = [], []
  for i in range(count):
    a = ref.spd_matrix(N, eigenvalues, seed=seed if shared else 100 * seed + i)
    s_list.append(rng.normal(size=N))
    y_list.append(a @ s_list[-1])
  return s_list, y_list


def _store(s_list, y_list, memory):
  store = pairs.empty(memory, N, jnp.float64)
  push = jax.jit(pairs.push)
  for s, y in zip(s_list, y_list):
    store = push(store, jnp.asarray(s), jnp.asarray(y), jnp.asarray(True))
  return store


@pytest.mark.parametrize("count,memory", [(5, 5), (3, 5), (1, 4), (8, 5)])
@pytest.mark.parametrize("shared", [True, False])
def test_lbfgs_two_loop_equals_dense_bfgs_recursion(count, memory, shared):
  with jax.enable_x64(True):
    s_list, y_list = _pairs(count, shared=shared, seed=count)
    store = _store(s_list, y_list, memory)
    kept = slice(max(0, count - memory), count)
    h = _bfgs_inverse(s_list[kept], y_list[kept])
    g = np.random.default_rng(10).normal(size=N)
    got = jax.jit(pairs.lbfgs_inverse_product)(store, jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(got), h @ g, rtol=1e-9, atol=1e-12)
    # The secant equation holds for the newest pair.
    np.testing.assert_allclose(
        np.asarray(pairs.lbfgs_inverse_product(store, jnp.asarray(y_list[-1]))),
        s_list[-1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("count,memory", [(5, 5), (3, 5), (2, 4), (8, 5)])
@pytest.mark.parametrize("definite", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_sr1_compact_inverse_equals_dense_sr1_recursion(count, memory, definite, shared):
  with jax.enable_x64(True):
    s_list, y_list = _pairs(count, definite=definite, shared=shared, seed=count)
    store = _store(s_list, y_list, memory)
    kept = slice(max(0, count - memory), count)
    h = _sr1_inverse(s_list[kept], y_list[kept])
    g = np.random.default_rng(11).normal(size=N)
    got = jax.jit(pairs.sr1_inverse_product)(store, jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(got), h @ g, rtol=1e-8, atol=1e-10)
    # The newest pair satisfies the secant equation H y = s; with one shared matrix SR1
    # is hereditary and every stored pair does.
    for s, y in list(zip(s_list[kept], y_list[kept]))[0 if shared else -1:]:
      np.testing.assert_allclose(np.asarray(pairs.sr1_inverse_product(store, jnp.asarray(y))),
                                 s, rtol=1e-7, atol=1e-9)


def test_sr1_single_pair_is_scaled_identity():
  """With ``H₀ = γI`` from the only pair, ``yᵀ(s − H₀y) = 0``: the SR1 correction is
  undefined (0/0) and is skipped, leaving ``H = γI`` — not a blow-up."""
  for dtype in (jnp.float32, jnp.float64):
    with jax.enable_x64(dtype == jnp.float64):
      s_list, y_list = _pairs(1, seed=5)
      store = pairs.empty(3, N, dtype)
      store = pairs.push(store, jnp.asarray(s_list[0], dtype), jnp.asarray(y_list[0], dtype),
                         jnp.asarray(True))
      s, y = s_list[0], y_list[0]
      g = np.random.default_rng(5).normal(size=N)
      got = pairs.sr1_inverse_product(store, jnp.asarray(g, dtype))
      np.testing.assert_allclose(np.asarray(got), (s @ y) / (y @ y) * g, rtol=1e-5)


def test_empty_store_is_identity():
  with jax.enable_x64(True):
    store = pairs.empty(4, N, jnp.float64)
    g = jnp.asarray(np.random.default_rng(0).normal(size=N))
    np.testing.assert_allclose(pairs.lbfgs_inverse_product(store, g), g)
    np.testing.assert_allclose(pairs.sr1_inverse_product(store, g), g)
    assert float(pairs.initial_scale(store)) == 1.0


def test_partial_store_layout():
  with jax.enable_x64(True):
    s_list, y_list = _pairs(3)
    store = _store(s_list, y_list, 5)
    assert int(store.count) == 3
    np.testing.assert_array_equal(np.asarray(store.s[2:]), np.stack(s_list))
    np.testing.assert_array_equal(np.asarray(store.y[2:]), np.stack(y_list))
    np.testing.assert_array_equal(np.asarray(store.s[:2]), 0.0)


def test_push_drops_the_oldest_and_respects_accept():
  with jax.enable_x64(True):
    s_list, y_list = _pairs(7)
    store = _store(s_list, y_list, 5)
    assert int(store.count) == 5
    np.testing.assert_array_equal(np.asarray(store.s), np.stack(s_list[2:]))
    np.testing.assert_array_equal(np.asarray(store.y), np.stack(y_list[2:]))
    refused = pairs.push(store, jnp.ones(N), jnp.ones(N), jnp.asarray(False))
    for got, kept in zip(jax.tree.leaves(refused), jax.tree.leaves(store)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(kept))


def test_initial_scale_is_newest_pair_ratio():
  with jax.enable_x64(True):
    s_list, y_list = _pairs(3)
    store = _store(s_list, y_list, 5)
    s, y = s_list[-1], y_list[-1]
    np.testing.assert_allclose(float(pairs.initial_scale(store)), (s @ y) / (y @ y),
                               rtol=1e-12)


def test_sr1_accepts_rejects_pairs_violating_the_condition():
  """``|yᵀ(s − Hy)| ≥ r‖y‖‖s − Hy‖`` decided with the dense SR1 matrix."""
  with jax.enable_x64(True):
    s_list, y_list = _pairs(3, definite=False, seed=3)
    store = _store(s_list, y_list, 5)
    h = _sr1_inverse(s_list, y_list)
    rng = np.random.default_rng(12)
    y = rng.normal(size=N)
    direction = rng.normal(size=N)
    direction -= (direction @ y) / (y @ y) * y        # orthogonal to y
    direction /= np.linalg.norm(direction)
    unit_y = y / np.linalg.norm(y)

    def candidate(cosine):
      """``s`` with ``s − Hy`` at the given cosine to ``y``."""
      residual = cosine * unit_y + np.sqrt(1 - cosine ** 2) * direction
      return h @ y + residual

    def accepts(s, y_, tol):
      return bool(pairs.sr1_accepts(store, jnp.asarray(s), jnp.asarray(y_), tol))

    assert not accepts(candidate(0.0), y, 1e-8)       # yᵀ(s − Hy) = 0
    assert not accepts(candidate(1e-3), y, 1e-2)      # below the tolerance
    assert accepts(candidate(1e-3), y, 1e-4)
    assert accepts(candidate(0.5), y, 1e-8)
    assert not accepts(h @ y, y, 1e-8)                # nothing new: s = Hy
    # A pair already satisfied by H (it is one of the stored ones) is also refused.
    assert not accepts(s_list[1], y_list[1], 1e-6)
