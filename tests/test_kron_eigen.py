"""The eigenbasis representation (curvax.kron.eigen, ``inverse="eigh"``/``"eigh_exact"``)
against dense references: the exact damped block ``(Q̃ ⊗ 𝒢̃ + kI)⁻¹`` solved with
``numpy.linalg.solve``, the factored damping against the Cholesky representation, and
the solver's trajectory against ``inverse="cholesky"``."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import losses
from curvax.kfac import _settings as validated, kronecker_factored
from curvax.kron import stages
from curvax.kron import state as kron_state

K = 3e-2


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


class _Net(nn.Module):
  """Every kind of slot: an embedding (diagonal Q̃), a LayerNorm (full block), a Dense
  without bias (an unused bias row in Q̃) and one with."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.LayerNorm()(nn.Embed(7, 5)(tokens))
    return nn.Dense(3)(jnp.tanh(nn.Dense(6, use_bias=False)(h)))


def _setup(representation):
  net = _Net()
  tokens = jnp.asarray([0, 3, 6, 2, 2, 5, 1, 4])
  targets = jnp.asarray([0, 1, 2, 1, 0, 2, 2, 1])
  params = net.init(jax.random.PRNGKey(0), tokens)
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1),
                                                              p.shape), params)
  defaults = {p.name: p.default for p in inspect.signature(
      kronecker_factored).parameters.values()
              if p.name not in ("loss", "estimator", "name", "inverse")}
  settings = validated("test", **defaults)
  factors, stored = representation.init(params)
  ctx = stages.make_context(settings, losses.softmax_cross_entropy(), factors,
                            jnp.asarray(0, jnp.int32), None, params,
                            predict_fn=lambda p: net.apply(p, tokens), targets=targets,
                            linearization=None)
  estimator = lambda cap, key: curvax.kron.kflr_factors(cap, key, fallback_diagonal=True,
                                                        weight_sharing="expand")
  factors, _ = stages.estimate_factors(ctx, settings, estimator, factors)
  rep = representation.refresh(factors, stored, ctx.capture, jnp.asarray(K))
  direction = representation.precondition(ctx.capture, ctx.grad, factors, rep,
                                          jnp.asarray(K))
  return ctx, factors, direction


def test_exact_damping_is_the_dense_damped_block_solve():
  ctx, factors, direction = _setup(stages.EIGH_EXACT)
  cap = ctx.capture
  assert {b.kind for b in cap.blocks} >= {"dense", "embed"} and cap.full_blocks
  grads, outs = jax.tree.leaves(ctx.grad), jax.tree.leaves(direction)
  for block in cap.blocks:
    q, g = np.asarray(factors.q[block.kernel]), np.asarray(factors.g[block.kernel])
    q = np.diag(q) if q.ndim == 1 else q
    v = np.asarray(kron_state._block_matrix(grads, block, q.shape[0]))
    dense = np.kron(q, g) + K * np.eye(q.shape[0] * g.shape[0])
    want = np.linalg.solve(dense, v.reshape(-1)).reshape(v.shape)
    got = np.asarray(kron_state._block_matrix(outs, block, q.shape[0]))
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
  for block in cap.full_blocks:
    f = np.asarray(factors.full[block.owner])
    v = np.concatenate([np.ravel(grads[j]) for j in block.leaves])
    want = np.linalg.solve(f + K * np.eye(f.shape[0]), v)
    got = np.concatenate([np.ravel(outs[j]) for j in block.leaves])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


def test_exact_and_factored_damping_differ():
  """The two dampings are different preconditioners (else the test above proves
  nothing about which one ran)."""
  _, _, exact = _setup(stages.EIGH_EXACT)
  _, _, factored = _setup(stages.EIGH)
  gap = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                         exact, factored)))
  assert gap > 1e-3


def test_factored_damping_equals_the_cholesky_inverses():
  _, _, eigh = _setup(stages.EIGH)
  _, _, cholesky = _setup(stages.CHOLESKY)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12),
               eigh, cholesky)


def _trajectory(inverse, steps=9, **kwargs):
  net = _Net()
  tokens = jnp.arange(12) % 7
  targets = jnp.arange(12) % 3
  params = jax.tree.map(lambda p: p.astype(jnp.float64),
                        net.init(jax.random.PRNGKey(2), tokens))
  tx = curvax.kfac("softmax_cross_entropy", inverse=inverse, **kwargs)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grad = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        net.apply(p, tokens), targets).mean())(params)
    updates, state = tx.update(grad, state, params,
                               predict_fn=lambda p: net.apply(p, tokens), targets=targets)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_eigh_solver_follows_the_cholesky_solver():
  """With every γ-rule step an inverse-refresh step, the two representations make the
  same steps (the γ rule picks the same candidates; one step agrees to 1e-8, above,
  and nine compound float64 rounding through ill-conditioned factors)."""
  p_chol, s_chol = _trajectory("cholesky", inverse_period=2, gamma_period=4)
  p_eigh, s_eigh = _trajectory("eigh", inverse_period=2, gamma_period=4)
  np.testing.assert_allclose(s_eigh.gamma, s_chol.gamma, rtol=1e-6)
  np.testing.assert_allclose(s_eigh.tau, s_chol.tau, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
               p_eigh, p_chol)


def _eighs(jaxpr, in_loop=False) -> list[bool]:
  """For every ``eigh`` the program runs, whether it sits inside a loop body."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "eigh":
      found.append(in_loop)
    inner = in_loop or eqn.primitive.name == "while"
    for value in eqn.params.values():
      for item in value if isinstance(value, (tuple, list)) else (value,):
        item = getattr(item, "jaxpr", item)
        if hasattr(item, "eqns"):
          found += _eighs(item, inner)
  return found


def test_gamma_rule_adds_no_decomposition():
  """On a γ-rule step (count 0) one ``eigh`` per matrix factor — 2 per Dense block, 1
  for the embedding's 𝒢̃, 1 for the LayerNorm's full block — none of them inside the
  loop over the γ candidates."""
  net = _Net()
  tokens = jnp.arange(6) % 7
  targets = jnp.arange(6) % 3
  params = net.init(jax.random.PRNGKey(0), tokens)
  tx = curvax.kfac("softmax_cross_entropy", inverse="eigh")
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda s: tx.update(
      params, s, params, predict_fn=lambda p: net.apply(p, tokens),
      targets=targets))(state)
  assert _eighs(jaxpr.jaxpr) == [False] * (2 + 2 + 1 + 1)


def test_unknown_inverse_is_a_clear_error():
  with pytest.raises(ValueError, match="inverse must be one of"):
    curvax.kfac("softmax_cross_entropy", inverse="svd")
