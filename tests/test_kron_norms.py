"""Full curvature blocks (curvax.kron.full_blocks): LayerNorm / RMSNorm scales and offsets
and a standalone bias, against the dense GGN of a tiny sequence model (jax.jacobian /
jax.hessian), and the warning that names exactly what falls back to the diagonal."""

import itertools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax
from curvax import kron
from curvax.kron import state as kron_state
from tests import dense_reference as ref

BATCH, POSITIONS, CLASSES = 2, 2, 3
LOSS = curvax.losses.softmax_cross_entropy()
DAMPING = 0.1


class _NormNet(nn.Module):
  """Per position: Dense → LayerNorm → tanh → the same LayerNorm again → RMSNorm → + a
  standalone bias → an offset-only LayerNorm → Dense."""

  @nn.compact
  def __call__(self, x):
    norm = nn.LayerNorm()
    h = norm(jnp.tanh(norm(nn.Dense(4)(x))))
    shift = self.param("shift", nn.initializers.normal(1.0), (4,))
    h = nn.LayerNorm(use_scale=False)(nn.RMSNorm()(h) + shift)
    return nn.Dense(CLASSES)(h)


def _problem(dtype=jnp.float64):
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k[0], (BATCH, POSITIONS, 5), dtype)
  model = _NormNet()
  params = model.init(k[1], x)
  # Away from the initial scale 1 / offset 0, so that every entry of the blocks matters.
  params = jax.tree.map(lambda a: (a + 0.5 * jax.random.normal(k[2], a.shape)).astype(dtype),
                        params)
  targets = jax.random.randint(k[3], (BATCH, POSITIONS), 0, CLASSES)
  return (lambda p: model.apply(p, x)), params, targets


def _loss_fn(outputs, targets):
  """curvax's cross-entropy: summed over positions, averaged over the batch."""
  return POSITIONS * ref.cross_entropy(outputs, targets)


def _flat_index(params, leaves):
  """ravel_pytree indices of these leaves, in this order."""
  sizes = [leaf.size for leaf in jax.tree.leaves(params)]
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return np.concatenate([np.arange(offsets[j], offsets[j + 1]) for j in leaves])


def test_full_blocks_are_the_dense_ggn_blocks_for_kflr_kfac_and_the_preconditioner():
  """GGN restricted to the scale/offset (or bias) parameters, Σ_n J_nᵀ H_n J_n:

  * KFLR's norm blocks equal it exactly (per-example gradients from x̂ and the
    sensitivities, summed over a layer's two calls; an offset-only layer), for a batch
    of 2 sequences of 2 positions;
  * KFLR's vector block (sign-mixed cotangents) equals it in expectation over the signs:
    the mean over 1000 keys lies within 5 standard errors (with no signs the
    cross-example terms make it biased);
  * KFAC's blocks equal it in exact expectation over the sampled targets (all 3⁴ joint
    targets, weighted by their probabilities: the Fisher is the GGN for cross-entropy);
  * the preconditioner applies ``(F + kI)⁻¹`` to the blocks' gradients.
  """
  with jax.enable_x64(True):
    predict, params, targets = _problem()
    ggn_all, grad = ref.dense_ggn(predict, params, targets, _loss_fn)
    info = {}

    def run(p):
      cap = kron.capture(predict, p, loss=LOSS, targets=targets)
      info.update(blocks=cap.full_blocks, fallback=cap.fallback)
      exact = kron.kflr_factors(cap)
      mixed = jax.vmap(lambda key: kron.kflr_factors(cap, key).full)(
          jax.random.split(jax.random.PRNGKey(1), 1000))
      # Every joint target with the square root of its probability: Σ columns columnsᵀ
      # is the exact expectation of the sampled (KFAC) estimate.
      joint = jnp.asarray(list(itertools.product(range(CLASSES),
                                                 repeat=BATCH * POSITIONS)))
      joint = joint.reshape(-1, BATCH, POSITIONS)
      log_p = jax.nn.log_softmax(cap.lin.outputs)
      weight = jnp.exp(jnp.sum(jnp.take_along_axis(
          log_p[None], joint[..., None], axis=-1)[..., 0], axis=(1, 2)))
      columns = jax.vmap(lambda t: kron.factors.sampled_columns(cap, t))(joint)
      columns = columns * jnp.sqrt(weight)[:, None, None, None]
      expected_kfac = kron.factors.from_columns(cap, columns, fallback_diagonal=False).full
      factors, inverse = kron_state.init(p)
      factors = kron_state.update(factors, exact, cap, decay=0.9, first=True)
      damping = jnp.asarray(DAMPING)
      inverse = kron_state.invert(factors, inverse, cap, damping)
      direction = kron_state.precondition(cap, cap.grad(), factors, inverse, damping)
      return exact.full, mixed, expected_kfac, direction

    exact, mixed, expected_kfac, direction = jax.jit(run)(params)
    blocks = info["blocks"]
    assert not info["fallback"]
    assert [(b.kind, b.name, b.dim, len(b.calls)) for b in blocks] == [
        ("norm", "LayerNorm_0", 8, 2), ("norm", "RMSNorm_0", 4, 1),
        ("norm", "LayerNorm_1", 4, 1), ("vector", "['params']['shift']", 4, 0)]
    direction = ref.flat(direction)
    for block, f_exact, f_mixed, f_kfac in zip(blocks, exact, mixed, expected_kfac):
      index = _flat_index(params, block.leaves)
      ggn = ggn_all[np.ix_(index, index)]
      np.testing.assert_allclose(f_kfac, ggn, rtol=1e-9, atol=1e-12)
      mean = np.mean(f_mixed, axis=0)
      error = np.std(f_mixed, axis=0) / np.sqrt(len(f_mixed))
      assert np.all(np.abs(mean - ggn) <= 5 * error + 1e-12), block.name
      if block.kind == "norm":
        np.testing.assert_allclose(f_exact, ggn, rtol=1e-9, atol=1e-12)
      else:  # without signs: biased by the cross-example terms
        assert np.abs(f_exact - ggn).max() > 0.1 * np.abs(ggn).max()
      solved = np.linalg.solve(f_exact + DAMPING * np.eye(block.dim), grad[index])
      np.testing.assert_allclose(direction[index], solved, rtol=1e-9, atol=1e-12)


def test_block_layout_reserved_from_names_and_shapes():
  """A Dense bias rides in its kernel's block, a LayerNorm's scale and offset share one
  block at the scale, other vectors own theirs; a bias whose kernel exceeds
  max_factor_dim gets its own block; blocks above it are not reserved."""
  shapes = {"Dense_0": {"bias": (4,), "kernel": (5, 4)},
            "LayerNorm_0": {"bias": (4,), "scale": (4,)},
            "RMSNorm_0": {"scale": (4,)},
            "big": {"bias": (3,), "kernel": (9, 3)},
            "shift": (4,), "wide": (9,)}
  params = jax.tree.map(jnp.zeros, shapes, is_leaf=lambda s: isinstance(s, tuple))
  names = [jax.tree_util.keystr(path) for path, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  dims = dict(zip(names, kron.capture_lib.full_slots(params, max_factor_dim=8)))
  assert {name: dim for name, dim in dims.items() if dim is not None} == {
      "['LayerNorm_0']['scale']": 8, "['RMSNorm_0']['scale']": 4,
      "['big']['bias']": 3, "['shift']": 4}
  factors, inverse = kron_state.init(params, max_factor_dim=8)
  assert [None if f is None else f.shape for f in factors.full] == [
      None if d is None else (d, d) for d in dims.values()]
  np.testing.assert_array_equal(inverse.full[names.index("['shift']")], np.eye(4))


def test_kfac_trains_without_fallback_and_the_warning_lists_only_what_falls_back():
  """KFAC trains the model with no fallback warning (every leaf has a block; the
  transformer of tests/test_transformer.py checks KFLR too); with max_factor_dim=5 the
  warning of KFAC and KFLR lists exactly the leaves left to the diagonal (the first
  Dense kernel, 6 × 4 factors; the LayerNorm's 8 × 8 block), not the first Dense's bias
  (then a vector block)."""
  predict, params, targets = _problem(jnp.float32)
  tx = curvax.kfac(LOSS, gamma_period=0, tau_period=0)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(None, state, params, predict_fn=predict, targets=targets)
    return optax.apply_updates(params, updates), state

  loss = lambda p: float(LOSS.value(predict(p), targets))
  first = loss(params)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(5):
      params, state = step(params, state)
  assert not [w for w in caught if "fallback" in str(w.message)]
  assert loss(params) < 0.7 * first, (first, loss(params))

  for solver in (curvax.kfac, curvax.kflr):
    small = solver(LOSS, max_factor_dim=5)
    with pytest.warns(UserWarning, match="fallback curvature block") as caught:
      jax.eval_shape(lambda p, s: small.update(None, s, p, predict_fn=predict,
                                               targets=targets),
                     params, small.init(params))
    assert len(caught) == 1
    message = str(caught[0].message)
    listed = message.split("\n")[1]
    assert listed == ("  ['params']['Dense_0']['kernel'], "
                      "['params']['LayerNorm_0']['bias'], "
                      "['params']['LayerNorm_0']['scale']"), message
    assert "LayerNorm_0: its 8 × 8 curvature block exceeds max_factor_dim" in message
