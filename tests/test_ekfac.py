"""EKFAC (curvax.ekfac, curvax.kron.ekfac) against dense references: the corrected
diagonal is the diagonal of the dense GGN block rotated into the factors' eigenbasis;
with one example the EKFAC block is the exact GGN block; the step trains."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import curvax
from curvax import kron, losses
from curvax.kfac import _settings as validated, kronecker_factored
from curvax.kron import ekfac as ekfac_lib
from curvax.kron import stages
from tests import dense_reference as ref

K = 3e-2


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w1": jax.random.normal(keys[0], (3, 4), jnp.float64),
            "b1": 0.3 * jax.random.normal(keys[1], (4,), jnp.float64),
            "w2": jax.random.normal(keys[2], (4, 3), jnp.float64),
            "b2": 0.3 * jax.random.normal(keys[3], (3,), jnp.float64)}
  return params


def _network(x, tagged: bool):
  """Dense → tanh → mean over positions → Dense: the first kernel is shared over the
  positions of ``x`` (shape ``(B, T, 3)``), the second sees one row per example."""
  dense = kron.dense if tagged else (lambda h, w, b: h @ w + b)

  def predict(p):
    hidden = jnp.tanh(dense(x, p["w1"], p["b1"]))
    return dense(jnp.mean(hidden, axis=1), p["w2"], p["b2"])
  return predict


def _data(batch: int, positions: int, seed: int):
  kx, ky = jax.random.split(jax.random.PRNGKey(100 + seed))
  return (jax.random.normal(kx, (batch, positions, 3), jnp.float64),
          jax.random.randint(ky, (batch,), 0, 3))


def _step(params, x, y, count=0, factors=None, stored=None):
  """EKFAC's stages 2–3 (exact GGN columns) at ``count``: at 0 the basis and the
  diagonal come from this batch."""
  defaults = {p.name: p.default for p in inspect.signature(
      kronecker_factored).parameters.values()
              if p.name not in ("loss", "estimator", "name", "inverse")}
  settings = validated("test", **defaults)
  if factors is None:
    factors, stored = stages.EKFAC.init(params)
  ctx = stages.make_context(settings, losses.softmax_cross_entropy(), factors,
                            jnp.asarray(count, jnp.int32), None, params,
                            predict_fn=_network(x, True), targets=y, linearization=None)
  estimator = lambda cap, key: kron.kflr_factors(cap, key, examples=True)
  factors, accept, rep = stages.estimate_and_represent(ctx, settings, estimator,
                                                       stages.EKFAC, factors, stored)
  assert bool(accept)
  return ctx, factors, rep


def _step_zero(batch: int, positions: int):
  params = _params()
  x, y = _data(batch, positions, 0)
  return (params, x, y) + _step(params, x, y)


def _dense_block(params, x, y, kernel: str, bias: str):
  """The GGN block of ``[kernel; bias]`` (``(in + 1, out)``, row-major) and its
  gradient."""
  plain = _network(x, False)

  def predict(v):
    return plain({**params, kernel: v[:-1], bias: v[-1]})

  block = jnp.concatenate([params[kernel], params[bias][None]], axis=0)
  ggn, grad = ref.dense_ggn(predict, block, y)
  return ggn, grad, block.shape


def _kernel_index(params, name):
  return sorted(params).index(name)  # jax.tree.leaves order of a dict


@pytest.mark.parametrize("layer", [("w1", "b1"), ("w2", "b2")])
def test_diagonal_is_the_dense_ggn_block_in_the_eigenbasis(layer):
  """``S = diag((U_Q ⊗ U_𝒢)ᵀ G_block (U_Q ⊗ U_𝒢))`` for a kernel shared over three
  positions (per-example gradients summed over them) and one that is not."""
  params, x, y, _, _, rep = _step_zero(batch=5, positions=3)
  i = _kernel_index(params, layer[0])
  expected = _rotated_diagonal(params, x, y, layer, rep)
  np.testing.assert_allclose(rep.scales[i], expected, rtol=1e-9, atol=1e-13)
  # The corrected diagonal is not KFAC's eigenvalue products (else the test is empty).
  products = np.outer(rep.basis.q_values[i], rep.basis.g_values[i])
  assert not np.allclose(rep.scales[i], products, rtol=1e-3)


def _rotated_diagonal(params, x, y, layer, rep):
  i = _kernel_index(params, layer[0])
  ggn, _, shape = _dense_block(params, x, y, *layer)
  rotation = np.kron(np.asarray(rep.basis.q_vectors[i]), np.asarray(rep.basis.g_vectors[i]))
  return np.diagonal(rotation.T @ ggn @ rotation).reshape(shape)


def test_diagonal_is_a_moving_average_in_the_current_basis():
  """At count 1 (no refresh: ``inverse_period`` 5) ``S = 0.9 S₀ + 0.1 Ŝ₁`` with ``Ŝ₁``
  the second batch's dense GGN block in the basis of count 0."""
  params, x0, y0, _, factors, rep0 = _step_zero(batch=5, positions=3)
  x1, y1 = _data(5, 3, 1)
  _, _, rep1 = _step(params, x1, y1, count=1, factors=factors, stored=rep0)
  for layer in (("w1", "b1"), ("w2", "b2")):
    i = _kernel_index(params, layer[0])
    np.testing.assert_array_equal(rep1.basis.q_vectors[i], rep0.basis.q_vectors[i])
    expected = 0.9 * rep0.scales[i] + 0.1 * _rotated_diagonal(params, x1, y1, layer, rep0)
    np.testing.assert_allclose(rep1.scales[i], expected, rtol=1e-9, atol=1e-13)


def test_scale_fraction_estimates_the_diagonal_on_the_leading_examples():
  """``scale_fraction=0.4`` of a batch of 5: ``Ŝ`` is the dense GGN block of the first
  two examples alone (their mean loss), in the basis of the whole batch's factors."""
  params, x, y, ctx, _, rep = _step_zero(batch=5, positions=3)
  estimate = kron.kflr_factors(ctx.capture, None, examples=True)
  fresh = ekfac_lib.correct(rep, ctx.capture, estimate, decay=0.9, first=jnp.asarray(True),
                            accept=jnp.asarray(True), fraction=0.4)
  for layer in (("w1", "b1"), ("w2", "b2")):
    i = _kernel_index(params, layer[0])
    expected = _rotated_diagonal(params, x[:2], y[:2], layer, rep)
    np.testing.assert_allclose(fresh.scales[i], expected, rtol=1e-9, atol=1e-13)
    assert not np.allclose(fresh.scales[i], rep.scales[i], rtol=1e-3)


def test_one_example_gives_the_exact_block_and_its_damped_solve():
  """One example, one position: the GGN block is ``a aᵀ ⊗ Σ_k c_k c_kᵀ``, which the
  eigenbasis diagonalises; EKFAC's block and ``(G_block + kI)⁻¹ ∇`` are exact."""
  params, x, y, ctx, factors, rep = _step_zero(batch=1, positions=1)
  direction = stages.EKFAC.precondition(ctx.capture, ctx.grad, factors, rep,
                                        jnp.asarray(K))
  for layer in (("w1", "b1"), ("w2", "b2")):
    i = _kernel_index(params, layer[0])
    ggn, grad, shape = _dense_block(params, x, y, *layer)
    rotation = np.kron(np.asarray(rep.basis.q_vectors[i]),
                       np.asarray(rep.basis.g_vectors[i]))
    block = rotation @ np.diag(np.asarray(rep.scales[i]).reshape(-1)) @ rotation.T
    np.testing.assert_allclose(block, ggn, atol=1e-12)
    solved = np.linalg.solve(ggn + K * np.eye(len(ggn)), grad).reshape(shape)
    got = np.concatenate([direction[layer[0]], direction[layer[1]][None]], axis=0)
    np.testing.assert_allclose(got, solved, rtol=1e-8, atol=1e-12)


def test_factored_damping_with_kfac_eigenvalues_is_kfac():
  """``damping_form="factored"`` adds to ``S`` what KFAC's factored damping adds to
  ``s_Q ⊗ s_𝒢``: with ``S`` replaced by ``s_Q ⊗ s_𝒢`` the step is KFAC's (eq. 36–38,
  :data:`stages.EIGH`), and with the real ``S`` it is not."""
  params, x, y, ctx, factors, rep = _step_zero(batch=5, positions=3)
  basis = rep.basis
  kfac_scales = tuple(None if s is None else basis.q_values[i][:, None]
                      * basis.g_values[i][None, :] for i, s in enumerate(rep.scales))
  damping = jnp.asarray(K)
  kfac = stages.EIGH.precondition(ctx.capture, ctx.grad, factors, basis, damping)
  as_kfac = stages.EKFAC_FACTORED.precondition(
      ctx.capture, ctx.grad, factors, rep._replace(scales=kfac_scales), damping)
  corrected = stages.EKFAC_FACTORED.precondition(ctx.capture, ctx.grad, factors, rep,
                                                 damping)
  for name in params:
    np.testing.assert_allclose(as_kfac[name], kfac[name], rtol=1e-9, atol=1e-13)
  assert not np.allclose(corrected["w1"], kfac["w1"], rtol=1e-3)


def test_example_scales_positions_loop_matches_outer_products():
  """The per-example loop (``T > 1``) and the one-matmul path (``T = 1``) agree with a
  literal sum of squared rotated outer products, including a zero-padded bias slot."""
  rng = np.random.default_rng(0)
  uq = np.linalg.qr(rng.normal(size=(5, 5)))[0]
  ug = np.linalg.qr(rng.normal(size=(3, 3)))[0]
  for positions in (1, 4):
    a = rng.normal(size=(6, positions, 4))  # q = 4 < 5: the slot's unused bias row
    c = rng.normal(size=(2, 6, positions, 3))
    padded = np.pad(a, ((0, 0), (0, 0), (0, 1)))
    literal = sum(np.square(uq.T @ (padded[n].T @ c[k, n]) @ ug)
                  for n in range(6) for k in range(2))
    got = ekfac_lib.example_scales(jnp.asarray(uq), jnp.asarray(ug), jnp.asarray(a),
                                   jnp.asarray(c))
    np.testing.assert_allclose(got, literal, rtol=1e-10)


def test_ekfac_trains():
  """Twelve jitted steps of each estimator on the tiny MLP (tagged layers): the loss
  falls by half and no batch is skipped."""
  mlp = ref.tiny_mlp(batch=16)
  predict = lambda p: kron.dense(jnp.tanh(kron.dense(mlp.x, p["w1"], p["b1"])),
                                 p["w2"], p["b2"])
  for curvature, form in (("fisher", "exact"), ("ggn", "exact"), ("fisher", "factored")):
    tx = curvax.ekfac("softmax_cross_entropy", curvature=curvature, damping_form=form)
    step = jax.jit(lambda p, s: tx.update(None, s, p, predict_fn=predict,
                                          targets=mlp.y))
    params, state = mlp.params, tx.init(mlp.params)
    start = ref.mlp_loss(params, mlp.x, mlp.y)
    for _ in range(12):
      updates, state = step(params, state)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    assert ref.mlp_loss(params, mlp.x, mlp.y) < 0.5 * start
    assert int(state.num_skipped) == 0


def test_bad_arguments():
  with pytest.raises(ValueError, match="inverse= does not apply"):
    curvax.ekfac("softmax_cross_entropy", inverse="eigh")
  with pytest.raises(ValueError, match="damping_form must be"):
    curvax.ekfac("softmax_cross_entropy", damping_form="factorised")
  for fraction in (0, 1.5, True, "half"):
    with pytest.raises(ValueError, match="scale_fraction must be"):
      curvax.ekfac("softmax_cross_entropy", scale_fraction=fraction)
  with pytest.raises(ValueError, match="curvature must be"):
    curvax.ekfac("softmax_cross_entropy", curvature="hessian")
  with pytest.raises(TypeError, match="did you mean 'num_samples'"):
    curvax.ekfac("softmax_cross_entropy", num_sample=2)
