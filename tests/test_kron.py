"""Kronecker-factored curvature: capture, factor estimators and damped inverses against
dense references built with jax.jacobian / jax.hessian, optax's losses and numpy."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from curvax import kron, losses
from curvax.problems import models
from tests import dense_reference as ref


def _bce(outputs, targets):
  return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(outputs, targets), axis=-1))


LOSSES = {
    "softmax_cross_entropy": (losses.softmax_cross_entropy(), ref.cross_entropy,
                              lambda k, b: jax.random.randint(k, (b,), 0, 3)),
    "squared_error": (losses.squared_error(), ref.squared_error,
                      lambda k, b: jax.random.normal(k, (b, 3), jnp.float64)),
    "sigmoid_binary_cross_entropy": (losses.sigmoid_binary_cross_entropy(), _bce,
                                     lambda k, b: jax.random.uniform(k, (b, 3), jnp.float64)),
}


def _estimate(predict, params, loss, targets, estimator):
  """``estimator(capture)`` in one jitted function; returns ``(estimate, capture info)``."""
  info = {}

  def run(p):
    cap = kron.capture(predict, p, loss=loss, targets=targets)
    info.update(blocks=cap.blocks, fallback=cap.fallback, names=cap.leaf_names,
                outputs=cap.lin.outputs, layer_outputs=cap.outputs)
    return estimator(cap), cap.lin.outputs, cap.outputs

  estimate, outputs, layer_outputs = jax.jit(run)(params)
  info.update(outputs=outputs, layer_outputs=layer_outputs)
  return estimate, info


def _offsets(params):
  sizes = [leaf.size for leaf in jax.tree.leaves(params)]
  return np.concatenate([[0], np.cumsum(sizes)])


def _block_index(params, block):
  """Flat (ravel_pytree) indices of a block in the Kronecker layout: kernel rows
  (row-major ``(in, out)``), then the bias as the last input row."""
  offsets = _offsets(params)
  index = []
  for i in range(block.q_dim):
    for j in range(block.out_dim):
      if i < block.in_dim:
        index.append(offsets[block.kernel] + i * block.out_dim + j)
      else:
        index.append(offsets[block.bias] + j)
  return np.asarray(index)


def _flax_mlp(batch, key=0):
  model = models.MLP(features=(4, 3, 3), activation=jnp.tanh)
  x = jax.random.normal(jax.random.PRNGKey(key), (batch, 5), jnp.float64)
  params = jax.tree.map(lambda a: a.astype(jnp.float64),
                        model.init(jax.random.PRNGKey(key + 1), x))
  return (lambda p: model.apply(p, x)), params


def _tagged_mlp(batch, key=0):
  """Pure JAX: a bias-free first layer, sigmoid, then a layer with bias."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(key), 4)
  params = {"w1": jax.random.normal(k1, (4, 5), jnp.float64),
            "w2": jax.random.normal(k2, (5, 3), jnp.float64) / 2,
            "b2": 0.1 * jax.random.normal(k3, (3,), jnp.float64)}
  x = jax.random.normal(k4, (batch, 4), jnp.float64)

  def predict(p):
    h = kron.dense(x, p["w1"])
    return kron.dense(jax.nn.sigmoid(h), p["w2"], p["b2"])

  def activations(p):  # hand forward pass: the inputs of each layer
    return [x, jax.nn.sigmoid(x @ p["w1"])]

  return predict, params, activations


# ------------------------------------------------------- exactness at batch size one


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_batch_one_kflr_and_kfra_factors_are_the_ggn_blocks(loss_name):
  """kfra_kflr.md eq. 19 / App. D.4: with one example Q ⊗ 𝒢 is the GGN block exactly."""
  loss, loss_fn, make_targets = LOSSES[loss_name]
  with jax.enable_x64(True):
    for predict, params, activation in (_flax_mlp(1) + (jnp.tanh,),
                                        _tagged_mlp(1)[:2] + (jax.nn.sigmoid,)):
      targets = make_targets(jax.random.PRNGKey(7), 1)
      ggn = ref.dense_ggn(predict, params, targets, loss_fn)[0]
      both = lambda cap: (kron.kflr_factors(cap), kron.kfra_factors(cap, activation))
      estimates, info = _estimate(predict, params, loss, targets, both)
      for estimate in estimates:
        for block, q, g in zip(info["blocks"], estimate.q, estimate.g):
          index = _block_index(params, block)
          np.testing.assert_allclose(np.kron(q, g), ggn[np.ix_(index, index)],
                                     rtol=1e-9, atol=1e-12)


def test_factors_for_a_batch_are_activation_covariance_and_expected_ggn():
  """Q̃ = mean ã ãᵀ (eq. 21) and KFLR's 𝒢̃ = (1/B) Σ_n 𝒢_n (eq. 25), which is the GGN's
  bias block for any batch size (the bias input is always 1)."""
  with jax.enable_x64(True):
    predict, params, activations = _tagged_mlp(5)
    targets = jax.random.randint(jax.random.PRNGKey(3), (5,), 0, 3)
    estimate, info = _estimate(predict, params, losses.softmax_cross_entropy(), targets,
                               kron.kflr_factors)
    ggn = ref.dense_ggn(predict, params, targets, ref.cross_entropy)[0]
    a0, a1 = activations(params)
    a1 = np.concatenate([a1, np.ones((5, 1))], axis=1)  # the bias's appended 1
    np.testing.assert_allclose(estimate.q[0], a0.T @ a0 / 5, rtol=1e-12)
    np.testing.assert_allclose(estimate.q[1], a1.T @ a1 / 5, rtol=1e-12)
    offsets = _offsets(params)  # leaves: b2, w1, w2
    bias = slice(offsets[0], offsets[1])
    np.testing.assert_allclose(estimate.g[1], ggn[bias, bias], rtol=1e-9, atol=1e-12)
    assert [b.bias is None for b in info["blocks"]] == [True, False]


def test_kfra_recursion_matches_algorithm_1_by_hand():
  """Algorithm 1 in numpy: 𝒢_L = mean_n H_n, 𝒢_{λ−1} = (Wᵀ𝒢W) ⊙ mean A′A′ᵀ."""
  with jax.enable_x64(True):
    predict, params, activations = _tagged_mlp(6)
    targets = jax.random.normal(jax.random.PRNGKey(4), (6, 3), jnp.float64)
    estimate, _ = _estimate(predict, params, losses.squared_error(), targets,
                            lambda cap: kron.kfra_factors(cap, jax.nn.sigmoid))
    x = np.asarray(activations(params)[0])
    w1, w2 = np.asarray(params["w1"]), np.asarray(params["w2"])
    g_out = 2.0 * np.eye(3)  # H_n of ‖o − t‖², the same for every example
    s = 1 / (1 + np.exp(-(x @ w1)))
    d = s * (1 - s)  # sigmoid′
    g_hidden = (w2 @ g_out @ w2.T) * (d.T @ d / 6)
    np.testing.assert_allclose(estimate.g[1], g_out, rtol=1e-12)
    np.testing.assert_allclose(estimate.g[0], g_hidden, rtol=1e-10)


def test_kfra_recursion_through_relu_and_linear_gaps_with_softmax():
  """Algorithm 1 in numpy on four layers with biases (gaps ReLU, linear, ReLU), a batch
  of 5 and softmax cross-entropy, whose H_n differs per example:
  𝒢_L = (1/B) Σ_n (diag p_n − p_n p_nᵀ), 𝒢_{λ−1} = (W_λᵀ𝒢_λW_λ) ⊙ (1/B) Σ_n f′(h_n)f′(h_n)ᵀ
  (f′ = 1 across the linear gap), and Q̃_λ = (1/B) Σ_n ã_n ã_nᵀ with the bias's 1."""
  with jax.enable_x64(True):
    dims, batch = (4, 5, 4, 4, 3), 5
    keys = jax.random.split(jax.random.PRNGKey(11), 2 * len(dims))
    params = [{"w": jax.random.normal(keys[2 * i], (dims[i], dims[i + 1]), jnp.float64),
               "b": 0.3 * jax.random.normal(keys[2 * i + 1], (dims[i + 1],), jnp.float64)}
              for i in range(len(dims) - 1)]
    x = jax.random.normal(keys[-1], (batch, dims[0]), jnp.float64)
    targets = jnp.arange(batch) % 3
    gaps = [jax.nn.relu, None, jax.nn.relu]

    def predict(p):
      a = x
      for i, layer in enumerate(p):
        a = kron.dense(a, layer["w"], layer["b"])
        if i < len(gaps) and gaps[i] is not None:
          a = gaps[i](a)
      return a

    estimate, _ = _estimate(predict, params, losses.softmax_cross_entropy(), targets,
                            lambda cap: kron.kfra_factors(cap, gaps))
    w = [np.asarray(layer["w"]) for layer in params]
    b = [np.asarray(layer["b"]) for layer in params]
    inputs, pre = [np.asarray(x)], []
    for i in range(len(w)):
      pre.append(inputs[-1] @ w[i] + b[i])
      if i < len(gaps):
        inputs.append(np.maximum(pre[-1], 0) if gaps[i] is not None else pre[-1])
    logits = pre[-1]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    g = [None] * len(w)
    g[-1] = sum(np.diag(p) - np.outer(p, p) for p in probs) / batch
    for lam in range(len(w) - 1, 0, -1):
      slope = (pre[lam - 1] > 0).astype(float) if gaps[lam - 1] is not None else \
          np.ones_like(pre[lam - 1])
      g[lam - 1] = (w[lam] @ g[lam] @ w[lam].T) * (slope.T @ slope / batch)
    assert not np.all(slope == 1) and not np.all(slope == 0)
    for lam in range(len(w)):
      a = np.concatenate([inputs[lam], np.ones((batch, 1))], axis=1)
      np.testing.assert_allclose(estimate.q[lam], a.T @ a / batch, rtol=1e-12)
      np.testing.assert_allclose(estimate.g[lam], g[lam], rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------- KFAC


def test_kfac_exact_expectation_over_classes_equals_kflr():
  """Σ_c p_c 𝒢(t̃ = c) — the sampled factor's exact expectation — is KFLR's 𝒢
  (App. D.2: Fisher = GGN for softmax cross-entropy)."""
  with jax.enable_x64(True):
    predict, params = _flax_mlp(1, key=3)
    loss = losses.softmax_cross_entropy()

    def per_class(cap):
      sampled = [kron.factors.from_columns(
          cap, kron.factors.sampled_columns(cap, jnp.array([c]))[None]).g
                 for c in range(3)]
      return sampled, kron.kflr_factors(cap).g

    (sampled, exact), info = _estimate(predict, params, loss, jnp.array([0]), per_class)
    probs = jax.nn.softmax(info["outputs"][0])
    for layer, g in enumerate(exact):
      expected = sum(probs[c] * sampled[c][layer] for c in range(3))
      np.testing.assert_allclose(expected, g, rtol=1e-10, atol=1e-14)


def test_kfac_monte_carlo_average_converges_to_kflr():
  with jax.enable_x64(True):
    predict, params = _flax_mlp(3, key=5)
    targets = jax.random.uniform(jax.random.PRNGKey(1), (3, 3), jnp.float64)

    def estimates(cap):
      return kron.kflr_factors(cap).g, [
          kron.kfac_factors(cap, jax.random.PRNGKey(0), num_samples=s).g
          for s in (10, 4000)]

    (exact, sampled_runs), _ = _estimate(
        predict, params, losses.sigmoid_binary_cross_entropy(), targets, estimates)
    errors = []
    for sampled in sampled_runs:
      errors.append(max(np.linalg.norm(s - e) / np.linalg.norm(e)
                        for s, e in zip(sampled, exact)))
    assert errors[1] < 0.05, errors
    assert errors[1] < errors[0] / 4, errors


# ------------------------------------------------------------------- convolutions


class _TinyCNN(nn.Module):
  kernel: tuple = (3, 3)
  strides: int = 2
  padding: str = "SAME"

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(2, self.kernel, strides=self.strides, padding=self.padding)(x)
    return nn.Dense(3)(jnp.tanh(h).reshape(x.shape[0], -1))


def _numpy_patches(x, k, stride, pad_before):
  """Patches (kh, kw, c_in) row-major at every output position, by loops."""
  batch, height, width, channels = x.shape
  padded = np.pad(x, ((0, 0), (pad_before, k), (pad_before, k), (0, 0)))
  out = (height + 2 * pad_before - k) // stride + 1 if pad_before == 0 else \
      -(-height // stride)
  rows = []
  for n in range(batch):
    for i in range(out):
      for j in range(out):
        window = padded[n, i * stride:i * stride + k, j * stride:j * stride + k, :]
        rows.append(window.reshape(-1))
  return np.asarray(rows).reshape(batch, out * out, k * k * channels)


def test_conv_factors_match_dense_kfc_computation():
  """KFC: Q̃ = mean over examples and positions of p̃ p̃ᵀ (patches by numpy loops), 𝒢̃ =
  (1/B) Σ_n Σ_t J_{h_nt}ᵀ H_n J_{h_nt} (Jacobians of the rest of the network)."""
  with jax.enable_x64(True):
    model = _TinyCNN()
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 2), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.PRNGKey(1), x))
    targets = jnp.array([0, 2])
    loss = losses.softmax_cross_entropy()
    estimate, info = _estimate(lambda p: model.apply(p, x), params, loss, targets,
                               kron.kflr_factors)
    q, g = estimate.q[0], estimate.g[0]
    assert info["blocks"][0].kind == "conv" and info["blocks"][0].in_dim == 18

    patches = _numpy_patches(np.asarray(x), 3, 2, pad_before=1)  # SAME: (k − 1) // 2 … 
    rows = np.concatenate([patches.reshape(-1, 18), np.ones((18, 1))], axis=1)
    np.testing.assert_allclose(q, rows.T @ rows / rows.shape[0], rtol=1e-12)

    p = params["params"]
    kernel = np.asarray(p["Conv_0"]["kernel"]).reshape(18, 2)
    h = patches @ kernel + np.asarray(p["Conv_0"]["bias"])  # (B, T, 2)
    np.testing.assert_allclose(h.reshape(info["layer_outputs"][0].shape),
                               info["layer_outputs"][0], rtol=1e-12)
    rest = lambda hn: jnp.tanh(hn).reshape(-1) @ p["Dense_0"]["kernel"] + \
        p["Dense_0"]["bias"]
    jacobian_and_hessian = jax.jit(lambda hn, t: (
        jax.jacobian(rest)(hn),
        jax.hessian(lambda o: ref.cross_entropy(o[None], t[None]))(rest(hn))))
    expected = np.zeros((2, 2))
    for n in range(2):
      jac, hess = jacobian_and_hessian(jnp.asarray(h[n]).reshape(3, 3, 2), targets[n])
      jac, hess = np.asarray(jac).reshape(3, 9, 2), np.asarray(hess)  # jac: (out, t, c)
      for t in range(9):
        expected += jac[:, t, :].T @ hess @ jac[:, t, :] / 2
    np.testing.assert_allclose(g, expected, rtol=1e-9, atol=1e-14)


def test_conv_with_one_position_and_one_example_is_exact():
  with jax.enable_x64(True):
    model = _TinyCNN(kernel=(4, 4), strides=1, padding="VALID")
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 2), jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.PRNGKey(3), x))
    targets = jnp.array([1])
    predict = lambda p: model.apply(p, x)
    estimate, info = _estimate(predict, params, losses.softmax_cross_entropy(), targets,
                               kron.kflr_factors)
    ggn = ref.dense_ggn(predict, params, targets, ref.cross_entropy)[0]
    for block, q, g in zip(info["blocks"], estimate.q, estimate.g):
      index = _block_index(params, block)
      np.testing.assert_allclose(np.kron(q, g), ggn[np.ix_(index, index)],
                                 rtol=1e-9, atol=1e-12)


# -------------------------------------------------------------- damped inverses


def test_damped_kron_inverse_matches_dense_solve():
  with jax.enable_x64(True):
    q = ref.spd_matrix(4, [3.0, 1.0, 0.2, 0.0], seed=1)
    g = ref.spd_matrix(3, [2.0, 0.5, 0.1], seed=2)
    v = np.random.default_rng(0).normal(size=(4, 3))
    k = 0.3
    omega = np.sqrt((np.trace(q) / 4) / (np.trace(g) / 3))  # eq. 38, trace norm
    damped = np.kron(q + omega * np.sqrt(k) * np.eye(4), g + np.sqrt(k) / omega * np.eye(3))
    expected = np.linalg.solve(damped, v.reshape(-1)).reshape(4, 3)
    got = kron.factored_inverse(jnp.asarray(q), jnp.asarray(g), jnp.asarray(v),
                                jnp.asarray(k), q_dim=4, g_dim=3)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    pi = 1.7
    got = kron.damped_kron_inverse(jnp.asarray(q), jnp.asarray(g), jnp.asarray(v), pi,
                                   1 / pi)
    dense = np.kron(q + pi * np.eye(4), g + np.eye(3) / pi)
    np.testing.assert_allclose(got.reshape(-1), np.linalg.solve(dense, v.reshape(-1)),
                               rtol=1e-10)


@pytest.mark.parametrize("n", [7, 400, 777, 1001])
def test_row_gram_is_the_gram_matrix_for_any_panel_count(n):
  """The panelled Gram product (upper blocks only; 1, 2, 3 and 4 panels here) is aᵀa."""
  from curvax.kron import factors
  with jax.enable_x64(True):
    a = np.random.default_rng(n).normal(size=(9, n))
    got = np.asarray(jax.jit(factors.row_gram)(jnp.asarray(a)))
    expected = a.T @ a
    np.testing.assert_allclose(got, expected, rtol=1e-12,
                               atol=1e-12 * np.abs(expected).max())


def test_estimate_finite_sees_a_non_finite_row_on_the_diagonals():
  """One NaN or infinite entry in the rows of a factor reaches its diagonal (and a
  finite batch passes), so the diagonals stand for the whole estimate."""
  from curvax.kron import factors, state
  a = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
  estimate = lambda rows: factors.Estimate(q=(factors.row_gram(jnp.asarray(rows)),),
                                           g=(jnp.eye(2),), diag=None)
  assert bool(state.estimate_finite(estimate(a)))
  for bad in (np.nan, np.inf, -np.inf):
    rows = a.copy()
    rows[4, 2] = bad
    assert not bool(state.estimate_finite(estimate(rows)))


@pytest.mark.parametrize("n", [129, 300, 700])
def test_blocked_spd_inverse_matches_dense_inverse(n):
  """The blocked inverse from the Cholesky factor (used on CPU for factors wider than one
  Cholesky block) is the inverse, for odd splits and several levels of recursion."""
  from curvax.kron import inverse
  with jax.enable_x64(True):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(2 * n, n)) * np.linspace(0.05, 3.0, n)
    m = a.T @ a / (2 * n) + 1e-3 * np.eye(n)
    expected = np.linalg.inv(m)
    for got in (jax.jit(inverse.blocked_spd_inverse)(jnp.asarray(m)),
                jax.jit(inverse.spd_inverse)(jnp.asarray(m))):
      np.testing.assert_allclose(got, expected, rtol=1e-8,
                                 atol=1e-8 * np.abs(expected).max())
    bad = jax.jit(inverse.blocked_spd_inverse)(jnp.asarray(m - 10 * np.eye(n)))
    assert not np.all(np.isfinite(bad))  # not positive definite: no silent answer


def test_spd_inverses_pads_and_groups_factors_exactly():
  """The grouped inverses (identity-padded to a multiple of 64 rows, one loop per padded
  size) are each matrix's own inverse: two sizes share a padded size (130, 190 → 192),
  one is alone (200 → 256), one is below a Cholesky block, and dtypes are kept apart."""
  from curvax.kron import inverse
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    def spd(n, dtype):
      a = rng.normal(size=(2 * n, n))
      return (a.T @ a / (2 * n) + 1e-2 * np.eye(n)).astype(dtype)
    matrices = [spd(130, np.float64), spd(20, np.float64), spd(190, np.float64),
                spd(200, np.float64), spd(150, np.float32)]
    got = jax.jit(inverse.spd_inverses)([jnp.asarray(m) for m in matrices])
    for m, inv in zip(matrices, got):
      assert inv.shape == m.shape and inv.dtype == m.dtype
      expected = np.linalg.inv(m.astype(np.float64))
      tol = 1e-9 if m.dtype == np.float64 else 1e-4
      np.testing.assert_allclose(inv, expected, atol=tol * np.abs(expected).max())


@pytest.mark.parametrize("n, rows, damping", [(401, 300, 1e-3), (785, 1000, 1e-5)])
def test_blocked_spd_inverse_is_as_accurate_as_cholesky_on_a_nearly_singular_factor(
    n, rows, damping):
  """float32, a (nearly) rank-deficient Gram of sigmoid activations (as in a wide layer
  at batch 1000) plus a small damping: the blocked factorisation and inverse keep the
  Cholesky solve's accuracy (explicit Schur complements lost two orders of magnitude
  here, and failed outright at smaller damping)."""
  from curvax.kron import inverse
  rng = np.random.default_rng(0)
  a = 1 / (1 + np.exp(-2 * rng.normal(size=(rows, n - 1)) - rng.normal(size=n - 1)))
  a = np.concatenate([a, np.ones((rows, 1))], axis=1)
  m = a.T @ a / rows + damping * np.eye(n)
  expected = np.linalg.inv(m)
  error = lambda f: (np.abs(np.asarray(jax.jit(f)(jnp.asarray(m, jnp.float32)), np.float64)
                            - expected).max() / np.abs(expected).max())
  # 3×, not 2×: the reference Cholesky's own error moves with OpenBLAS's threading (the
  # ratio measured 1.0–2.03 across runs); the failure this guards against was ~100×.
  assert error(inverse.blocked_spd_inverse) < 3 * error(inverse.cholesky_inverse) + 1e-6


# --------------------------------------------------------------------- fallback


class _WithLayerNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.LayerNorm()(jnp.tanh(nn.Dense(4)(x))))


def test_unfactored_parameters_warn_and_get_their_ggn_diagonal():
  """With one example, Σ_k (Jᵀ r_k C_k)² is exactly the GGN diagonal: an untagged
  kernel falls back to it, named in the warning (its bias, a vector, gets a full
  block: tests/test_kron_norms.py)."""
  with jax.enable_x64(True):
    predict, params, _ = _tagged_mlp(1)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4), jnp.float64)
    predict = lambda p: jax.nn.sigmoid(kron.dense(x, p["w1"])) @ p["w2"] + p["b2"]
    targets = jnp.array([2])
    with pytest.warns(UserWarning, match=r"block \(a diagonal.*\n  \['w2'\]$") as caught:
      estimate, info = _estimate(predict, params, losses.softmax_cross_entropy(), targets,
                                 lambda cap: kron.kflr_factors(cap, jax.random.PRNGKey(0)))
    assert len(caught) == 1 and "b2" not in str(caught[0].message)
    assert [info["names"][i] for i in info["fallback"]] == ["['w2']"]
    ggn = ref.dense_ggn(predict, params, targets, ref.cross_entropy)[0]
    offsets = _offsets(params)
    for i, diag in zip(info["fallback"], estimate.diag):
      span = slice(offsets[i], offsets[i + 1])
      np.testing.assert_allclose(diag.reshape(-1), np.diag(ggn)[span], rtol=1e-9,
                                 atol=1e-14)


# ------------------------------------------------------------------- bad inputs


def test_model_without_layers_is_a_clear_error():
  params = {"w": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="found no Dense or Conv layer"):
    kron.capture(lambda p: jnp.ones((4, 3)) @ p["w"], params, loss="squared_error",
                 targets=jnp.zeros((4, 2)))


def test_transformed_weight_is_not_captured():
  params = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="not a leaf"):
    kron.capture(lambda p: kron.dense(jnp.ones((4, 3)), p["w"].T), params,
                 loss="squared_error", targets=jnp.zeros((4, 2)))


class _Residual(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(3)(x)
    return nn.Dense(3)(jnp.tanh(h)) + h  # a skip connection: not a chain


def _kfra(model, x, targets, loss, activations, traced_batch=False):
  params = model.init(jax.random.PRNGKey(0), x)
  run = lambda p, xb: kron.kfra_factors(
      kron.capture(lambda q: model.apply(q, xb), p, loss=loss, targets=targets),
      activations).g
  if traced_batch:
    return jax.block_until_ready(jax.jit(run)(params, x))
  return jax.block_until_ready(jax.jit(lambda p: run(p, x))(params))


def test_kfra_refuses_models_that_are_not_chains():
  images, x = jnp.ones((2, 5, 5, 2)), jnp.ones((2, 3))
  labels = jnp.array([0, 1])
  with pytest.raises(ValueError, match="Conv_0 is a convolution"):
    _kfra(_TinyCNN(), images, labels, "softmax_cross_entropy", jnp.tanh)
  with pytest.raises(ValueError, match="LayerNorm_0 is a normalisation layer"):
    _kfra(_WithLayerNorm(), x, labels, "softmax_cross_entropy", jnp.tanh)
  lone_bias = lambda p: kron.dense(x, p["w"]) + p["b"]  # b: a full block, not a layer
  with pytest.raises(ValueError, match=r"parameters \['b'\] belong to no Dense"):
    kron.kfra_factors(kron.capture(lone_bias, {"w": jnp.ones((3, 2)), "b": jnp.ones(2)},
                                   loss="squared_error", targets=jnp.zeros((2, 2))), None)
  mlp = models.MLP(features=(4, 3))
  with pytest.raises(ValueError, match="activations has 2 entries"):
    _kfra(mlp, x, labels, "softmax_cross_entropy", [jnp.tanh, jnp.tanh])
  # A wrong activation is a ValueError at trace time (from the model's jaxpr), inside
  # jit with a traced batch; the same function written differently is accepted.
  relu_mlp = models.MLP(features=(4, 3), activation=jax.nn.relu)
  for model, declared in ((mlp, jax.nn.relu), (relu_mlp, jnp.tanh), (mlp, None)):
    with pytest.raises(ValueError, match="is not what the model applies"):
      _kfra(model, x, labels, "softmax_cross_entropy", declared, traced_batch=True)
  _kfra(mlp, x, labels, "softmax_cross_entropy", jnp.tanh)  # the right description
  _kfra(relu_mlp, x, labels, "softmax_cross_entropy", lambda h: jnp.maximum(h, 0.0),
        traced_batch=True)
  # A gap that reads more than h (a skip connection reads the batch) is checked at run
  # time, inside jit.
  with pytest.raises(Exception, match="not the chain"):
    _kfra(_Residual(), x, jnp.zeros((2, 3)), "squared_error", jnp.tanh)


def test_kfra_activation_check_without_public_debug_info(monkeypatch):
  # jax < 0.10 has no jax.extend.core.DebugInfo (pyproject allows jax 0.4.30): the
  # trace-time check must still build its sub-jaxpr and catch a wrong activation.
  import jax.extend.core as jex
  if hasattr(jex, "DebugInfo"):
    monkeypatch.delattr(jex, "DebugInfo")
  x, labels = jnp.ones((2, 3)), jnp.array([0, 1])
  with pytest.raises(ValueError, match="is not what the model applies"):
    _kfra(models.MLP(features=(4, 3)), x, labels, "softmax_cross_entropy", jax.nn.relu)


def test_chain_activations_of_the_paper_models():
  assert kron.chain_activations(models.MLP(features=(4, 3, 2))) == [jnp.tanh, jnp.tanh]
  sig = nn.sigmoid
  assert kron.chain_activations(models.Autoencoder(hidden=(6, 4, 2))) == [
      sig, sig, None, sig, sig]
  with pytest.raises(TypeError, match="unknown model"):
    kron.chain_activations(models.BasicCNN())


# ------------------------------------------- weight sharing (Eschenhagen et al. 2023)


def _shared_linear(batch, positions, pool, key=0):
  """Pure JAX, linear, one kernel pair applied at every position: per-position outputs
  (``pool=False``: the expand setting) or mean-pooled before the last layer (reduce)."""
  k = jax.random.split(jax.random.PRNGKey(key), 5)
  params = {"w1": jax.random.normal(k[0], (3, 4), jnp.float64) / 2,
            "b1": jax.random.normal(k[1], (4,), jnp.float64),
            "w2": jax.random.normal(k[2], (4, 2), jnp.float64) / 2,
            "b2": jax.random.normal(k[3], (2,), jnp.float64)}
  x = jax.random.normal(k[4], (batch, positions, 3), jnp.float64)

  def predict(p):
    h = kron.dense(x, p["w1"], p["b1"])
    return kron.dense(jnp.mean(h, axis=1) if pool else h, p["w2"], p["b2"])

  return predict, params


@pytest.mark.parametrize("setting", ["expand", "reduce"])
def test_weight_sharing_setting_is_exact_for_deep_linear_networks_in_its_setting(setting):
  """Eschenhagen et al. 2023 (§3): K-FAC-expand is exact for deep linear networks whose
  loss treats the positions as examples (squared error per position), K-FAC-reduce for
  those that reduce the shared axis before the output (mean pooling); against the dense
  GGN, batch 2, 3 positions. The other setting is not exact there."""
  other = {"expand": "reduce", "reduce": "expand"}[setting]
  with jax.enable_x64(True):
    predict, params = _shared_linear(2, 3, pool=setting == "reduce")
    outputs = predict(params)
    targets = jax.random.normal(jax.random.PRNGKey(9), outputs.shape, jnp.float64)
    ggn = ref.dense_ggn(predict, params, targets, ref.squared_error)[0]
    both = lambda cap: tuple(kron.kflr_factors(cap, weight_sharing=s)
                             for s in (setting, other))
    (exact, inexact), info = _estimate(predict, params, losses.squared_error(), targets,
                                       both)
    shared = info["blocks"][0]
    assert shared.name == "curvax.kron.dense" and shared.q_dim == 4
    for block, q, g in zip(info["blocks"], exact.q, exact.g):
      index = _block_index(params, block)
      np.testing.assert_allclose(np.kron(q, g), ggn[np.ix_(index, index)], rtol=1e-9,
                                 atol=1e-12)
    index = _block_index(params, shared)
    assert not np.allclose(np.kron(inexact.q[0], inexact.g[0]), ggn[np.ix_(index, index)],
                           rtol=1e-3)


def test_weight_sharing_factors_match_their_definitions_on_a_position_mixing_network():
  """A kernel shared over positions with a causal mixing after it and a per-position
  cross-entropy (no setting is exact): expand and reduce factors against their
  definitions (Eschenhagen et al. 2023, eq. for K-FAC-expand / -reduce) from dense
  Jacobians of the outputs w.r.t. the shared layer's outputs, batch 2, 3 positions:
  expand Q̃ = (1/BR) Σ_{n,r} ã ãᵀ, 𝒢̃ = (1/B) Σ_n Σ_r J_{nr}ᵀ H_n J_{nr};
  reduce Q̃ = (1/B) Σ_n â_n â_nᵀ (â the positions' mean), 𝒢̃ = (1/B) Σ_n Ĵ_nᵀ H_n Ĵ_n
  (Ĵ_n = Σ_r J_{nr})."""
  with jax.enable_x64(True):
    batch, positions = 2, 3
    k = jax.random.split(jax.random.PRNGKey(4), 4)
    params = {"w1": jax.random.normal(k[0], (3, 4), jnp.float64),
              "b1": jax.random.normal(k[1], (4,), jnp.float64),
              "w2": jax.random.normal(k[2], (4, 5), jnp.float64)}
    x = jax.random.normal(k[3], (batch, positions, 3), jnp.float64)
    causal = np.tril(np.ones((positions, positions))) / np.arange(1, positions + 1)[:, None]

    def rest(h, p):  # from the shared layer's outputs to the network outputs
      return jnp.einsum("ts,nsf->ntf", causal, jnp.tanh(h)) @ p["w2"]

    predict = lambda p: rest(kron.dense(x, p["w1"], p["b1"]), p)
    targets = jnp.array([[0, 4, 2], [1, 1, 3]])
    run = lambda cap: {s: kron.kflr_factors(cap, weight_sharing=s)
                       for s in ("expand", "reduce")}
    with pytest.warns(UserWarning, match="w2"):  # w2 is not tagged: the fallback
      estimates, info = _estimate(predict, params, losses.softmax_cross_entropy(),
                                  targets, run)
    h = np.asarray(x @ params["w1"] + params["b1"])
    jac = np.stack([np.asarray(jax.jacobian(lambda hn: rest(hn[None], params)[0])(
        jnp.asarray(h[n]))).reshape(positions * 5, positions, 4) for n in range(batch)])
    outputs = np.asarray(info["outputs"])
    hess = np.stack([np.asarray(jax.hessian(lambda o: ref.cross_entropy(
        o.reshape(1, positions, 5), targets[n][None]))(jnp.asarray(outputs[n]).reshape(-1)))
                     for n in range(batch)]) * positions  # ref: a mean over positions
    a = np.concatenate([np.asarray(x), np.ones((batch, positions, 1))], axis=-1)
    g_expand = sum(jac[n, :, r].T @ hess[n] @ jac[n, :, r] for n in range(batch)
                   for r in range(positions)) / batch
    summed = jac.sum(axis=2)
    g_reduce = sum(summed[n].T @ hess[n] @ summed[n] for n in range(batch)) / batch
    mean_a = a.mean(axis=1)
    rows = a.reshape(-1, 4)
    expected = {"expand": (rows.T @ rows / rows.shape[0], g_expand),
                "reduce": (mean_a.T @ mean_a / batch, g_reduce)}
    for setting, (q, g) in expected.items():
      np.testing.assert_allclose(estimates[setting].q[0], q, rtol=1e-10)
      np.testing.assert_allclose(estimates[setting].g[0], g, rtol=1e-9, atol=1e-13)


class _EmbedAttention(nn.Module):
  """Embedding, causal self-attention (DenseGeneral projections), a Dense read-out."""

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(5, 4)(tokens)
    mask = nn.make_causal_mask(tokens)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(h, mask=mask)
    return nn.Dense(5)(h)


def test_attention_projections_and_embedding_are_exact_with_one_row():
  """With one example at one position every block has one row, so Q ⊗ 𝒢 is the GGN
  block exactly (eq. 19): checks the layouts of the DenseGeneral projections
  ((F, heads, head_dim) kernels with (heads, head_dim) biases, (heads, head_dim, F)
  output kernel) and of the embedding's diagonal input factor."""
  with jax.enable_x64(True):
    model = _EmbedAttention()
    tokens = jnp.array([[3]])
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.PRNGKey(0), tokens))
    predict = lambda p: model.apply(p, tokens)
    targets = jnp.array([[1]])
    estimate, info = _estimate(predict, params, losses.softmax_cross_entropy(), targets,
                               kron.kflr_factors)
    assert not info["fallback"]
    kinds = sorted((b.kind, b.q_dim, b.out_dim) for b in info["blocks"])
    assert kinds == [("dense", 5, 4)] * 4 + [("dense", 5, 5), ("embed", 5, 4)]
    ggn = ref.dense_ggn(predict, params, targets, ref.cross_entropy)[0]
    for block, q, g in zip(info["blocks"], estimate.q, estimate.g):
      if block.kind == "embed":
        np.testing.assert_array_equal(q, np.eye(5)[3])  # the token's one-hot, as a vector
        q = np.diag(q)
      index = _block_index(params, block)
      np.testing.assert_allclose(np.kron(q, g), ggn[np.ix_(index, index)], rtol=1e-9,
                                 atol=1e-12)
