"""Property-based tests (hypothesis): losses, CVP products, solver invariants, bad inputs.

* Losses on random outputs (batch sizes from 1, float32 and float64): ``H_L`` symmetric
  positive semi-definite, ``hessian_vp`` and ``hessian_sqrt`` reproducing the dense
  ``jax.hessian`` of ``value``, ``grad = jax.grad(value)``, and sampled targets with the
  predictive distribution's moments (their score covariance is ``H_ℓ``).
* Every CVP of :class:`curvax.Linearization` against dense matrices built with
  ``jax.jacobian`` / ``jax.hessian`` on random tiny networks (random depth, widths, batch
  size, dtype, loss).
* A non-finite batch, anywhere in it, after any number of steps, leaves the parameters and
  the whole chain's state (clipping and weight decay around the solver) bit-identical but
  for the skip counter.
* Fuzzed bad inputs (shapes, dtypes, NaN/inf, an empty batch, labels out of range): each
  is a clear Python error raised while tracing (before XLA runs) or a counted skip.

Examples are few (``max_examples``) and derandomised, so the suite is quick and
reproducible; the solvers' jitted steps are shared with ``tests/test_reliability.py``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import curvax  # noqa: E402
from curvax import cvp  # noqa: E402
from tests import test_reliability as rel  # noqa: E402

LOSSES = ("squared_error", "softmax_cross_entropy", "sigmoid_binary_cross_entropy")
DTYPES = ("float32", "float64")


def examples(n):
  return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow,
                                         HealthCheck.function_scoped_fixture])


def precision(dtype):
  """A context running in ``dtype`` (x64 on for float64) and its relative tolerance."""
  if dtype == "float64":
    return jax.enable_x64(True), 1e-9
  return jax.enable_x64(False), 3e-4


def random_targets(loss_name, key, outputs, integer_labels=True):
  if loss_name == "squared_error":
    return jax.random.normal(key, outputs.shape, outputs.dtype)
  if loss_name == "sigmoid_binary_cross_entropy":
    return jax.random.uniform(key, outputs.shape, outputs.dtype)
  if integer_labels:
    return jax.random.randint(key, outputs.shape[:-1], 0, outputs.shape[-1])
  return jax.nn.softmax(jax.random.normal(key, outputs.shape, outputs.dtype))


def assert_close(actual, expected, rtol):
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


# ---------------------------------------------------------------------------- losses


@functools.lru_cache(maxsize=None)
def loss_quantities(loss_name):
  """One jitted function per loss (a compile per shape, not one per primitive)."""
  loss = curvax.losses.get(loss_name)

  @jax.jit
  def quantities(outputs, targets, u):
    size = outputs.size
    dense = jax.hessian(loss.value)(outputs, targets).reshape(size, size)
    value, grad = loss.value_and_grad(outputs, targets)
    return dict(dense=dense, hvp=loss.hessian_vp(outputs, targets, u),
                sqrt=loss.hessian_sqrt(outputs, targets), grad=loss.grad(outputs, targets),
                value=value, value_grad=grad, value_only=loss.value(outputs, targets),
                autodiff_grad=jax.grad(loss.value)(outputs, targets))
  return quantities


@examples(8)
@given(loss_name=st.sampled_from(LOSSES), dtype=st.sampled_from(DTYPES),
       batch=st.integers(1, 3), width=st.integers(1, 3), labels=st.booleans(),
       seed=st.integers(0, 2**16))
def test_loss_derivatives_match_autodiff(loss_name, dtype, batch, width, labels, seed):
  if loss_name == "softmax_cross_entropy" and width == 1:
    width = 2  # one class has no curvature to compare; keep the example meaningful
  context, rtol = precision(dtype)
  with context:
    ko, kt, ku = jax.random.split(jax.random.PRNGKey(seed), 3)
    outputs = 2 * jax.random.normal(ko, (batch, width), jnp.dtype(dtype))
    targets = random_targets(loss_name, kt, outputs, labels)
    u = jax.random.normal(ku, outputs.shape, outputs.dtype)
    q = jax.tree.map(np.asarray, loss_quantities(loss_name)(outputs, targets, u))
  dense = q["dense"]
  # H_L symmetric PSD.
  assert_close(dense, dense.T, rtol)
  assert np.min(np.linalg.eigvalsh(dense)) >= -rtol * max(1.0, np.max(np.abs(dense)))
  # hessian_vp = H_L u.
  assert_close(q["hvp"].reshape(-1), dense @ np.asarray(u).reshape(-1), rtol)
  # hessian_sqrt: H_L block diagonal over examples, block n = Σ_k C[k, n] C[k, n]ᵀ.
  columns = q["sqrt"].reshape(-1, batch, width)
  blocks = np.einsum("kni,knj->nij", columns, columns)
  square = dense.reshape(batch, width, batch, width)
  diagonal = np.einsum("ninj->nij", square)
  assert_close(square, np.einsum("nm,nimj->nimj", np.eye(batch), square), rtol)
  assert_close(blocks, diagonal, rtol)
  # grad = jax.grad(value); value_and_grad agrees with both.
  assert_close(q["grad"], q["autodiff_grad"], rtol)
  assert_close(q["value_grad"], q["autodiff_grad"], rtol)
  assert_close(q["value"], q["value_only"], rtol)


@examples(4)
@given(loss_name=st.sampled_from(LOSSES), width=st.integers(1, 3), labels=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sampled_targets_have_the_predictive_moments(loss_name, width, labels, seed):
  """``E_t[∇ℓ ∇ℓᵀ] = H_ℓ`` for ``t ~ p(t|o)``, and the sample mean is the predictive mean."""
  if loss_name == "softmax_cross_entropy":
    width += 1
  loss = curvax.losses.get(loss_name)
  draws = 4000
  ko, kt, ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  outputs = jax.random.normal(ko, (1, width))
  like = random_targets(loss_name, kt, outputs, labels)

  @jax.jit
  def draw(key):
    samples = jax.vmap(lambda k: loss.sample(k, outputs, like))(jax.random.split(key, draws))
    # Per-example score of each draw (one example: the batch mean is its loss).
    scores = jax.vmap(lambda t: jax.grad(loss.value)(outputs, t))(samples)
    return samples, scores.reshape(draws, -1), jax.hessian(loss.value)(outputs, like)

  samples, scores, hessian = draw(ks)
  assert samples.dtype == like.dtype and samples.shape == (draws,) + like.shape
  scores = np.asarray(scores, np.float64)
  outer = scores[:, :, None] * scores[:, None, :]
  stderr = outer.std(axis=0) / np.sqrt(draws)
  np.testing.assert_array_less(
      np.abs(outer.mean(axis=0) - np.asarray(hessian).reshape(width, width)),
      6 * stderr + 1e-6)
  values = np.asarray(samples, np.float64)
  if loss_name == "softmax_cross_entropy":
    values = values if values.ndim == 3 else np.eye(width)[samples]
    expected = jax.nn.softmax(outputs)
  elif loss_name == "sigmoid_binary_cross_entropy":
    expected = jax.nn.sigmoid(outputs)
  else:
    expected = outputs
  values = values.reshape(draws, -1)
  np.testing.assert_array_less(np.abs(values.mean(0) - np.asarray(expected).reshape(-1)),
                               6 * values.std(0) / np.sqrt(draws) + 1e-6)


# ---------------------------------------------------------------------- CVP products


def random_network(key, depth, widths, dtype):
  """A tanh MLP with the given hidden widths; returns ``(params, predict)``."""
  params = []
  for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
    kw, kb, key = jax.random.split(key, 3)
    params.append({"w": jax.random.normal(kw, (n_in, n_out), dtype) / np.sqrt(n_in),
                   "b": 0.1 * jax.random.normal(kb, (n_out,), dtype)})
  assert len(params) == depth

  def predict(p, x):
    for i, layer in enumerate(p):
      x = x @ layer["w"] + layer["b"]
      if i < len(p) - 1:
        x = jnp.tanh(x)
    return x
  return params, predict


@examples(4)
@given(loss_name=st.sampled_from(LOSSES), dtype=st.sampled_from(DTYPES),
       depth=st.integers(1, 3), data=st.data(), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_curvature_products_match_dense_matrices(loss_name, dtype, depth, data, batch,
                                                 seed):
  widths = data.draw(st.lists(st.integers(1, 3), min_size=depth + 1, max_size=depth + 1))
  if loss_name == "softmax_cross_entropy":
    widths[-1] += 1  # at least two classes
  context, rtol = precision(dtype)
  with context:
    dt = jnp.dtype(dtype)
    kp, kx, kt, kv = jax.random.split(jax.random.PRNGKey(seed), 4)
    params, network = random_network(kp, depth, widths, dt)
    x = jax.random.normal(kx, (batch, widths[0]), dt)
    predict = lambda p: network(p, x)
    targets = random_targets(loss_name, kt, jax.eval_shape(predict, params))
    loss = curvax.losses.get(loss_name)
    q = jax.tree.map(np.asarray, cvp_quantities(loss, predict, params, targets, kv))
  for name in ("jvp", "vjp", "grad", "ggn", "hessian", "fisher", "fused", "fused_jz",
               "loss_value"):
    assert_close(q[name], q[name + "_ref"], rtol)


@functools.partial(jax.jit, static_argnums=(0, 1))
def cvp_quantities(loss, predict, params, targets, key):
  """curvax's products and their dense references, in one compiled function."""
  lin = curvax.linearize(predict, params, loss=loss, targets=targets)
  outputs = predict(params)
  flat, unravel = ravel_pytree(params)
  flat_predict = lambda w: predict(unravel(w)).reshape(-1)
  jac = jax.jacobian(flat_predict)(flat)                       # (B·K, P)
  size = outputs.size
  h_out = jax.hessian(loss.value)(outputs, targets).reshape(size, size)
  objective = lambda w: loss.value(predict(unravel(w)), targets)
  per_example = jax.jacobian(
      lambda w: loss.per_example_values(predict(unravel(w)), targets))(flat)
  grad = jax.grad(objective)(flat)
  ggn = jac.T @ h_out @ jac
  v = jax.random.normal(key, flat.shape, flat.dtype)
  u = jax.random.normal(jax.random.fold_in(key, 1), (size,), flat.dtype)
  flat_of = lambda tree: ravel_pytree(tree)[0]
  fused = lin.fused_ggn_vp(unravel(v))
  return dict(
      jvp=lin.jvp(unravel(v)).reshape(-1), jvp_ref=jac @ v,
      vjp=flat_of(lin.vjp(u.reshape(outputs.shape))), vjp_ref=jac.T @ u,
      grad=flat_of(lin.grad()), grad_ref=grad,
      ggn=cvp.dense_matrix(lin.ggn_vp, params), ggn_ref=ggn,
      hessian=cvp.dense_matrix(lin.hessian_vp, params),
      hessian_ref=jax.hessian(objective)(flat),
      fisher=cvp.dense_matrix(lin.fisher_vp, params),
      fisher_ref=per_example.T @ per_example / outputs.shape[0],
      fused=flat_of(fused.product), fused_ref=ggn @ v + grad,
      fused_jz=fused.jz.reshape(-1), fused_jz_ref=jac @ v,
      loss_value=lin.loss_value, loss_value_ref=loss.value(outputs, targets))


# ------------------------------------------------------------- solver invariants

CHAINED = {}


def chained(name):
  """``(tx, step)``: clipping and weight decay on the gradient before the solver, clipping
  after it, the gradient given (so the clip and decay act on it)."""
  if name not in CHAINED:
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-3),
                     rel.SOLVERS[name](), optax.clip_by_global_norm(10.0))

    @jax.jit
    def step(params, state, x, y):
      predict = lambda p: rel.predict(p, x)
      objective = lambda p: curvax.losses.get(rel.LOSS).value(predict(p), y)
      updates, state = tx.update(jax.grad(objective)(params), state, params,
                                 predict_fn=predict, targets=y)
      return optax.apply_updates(params, updates), state
    CHAINED[name] = tx, step
  return CHAINED[name]


def solver_state(state):
  return state if hasattr(state, "num_skipped") else state[2]


def assert_skipped(name, before, after):
  (params, state), (new_params, new_state) = before, after
  rel.assert_trees_equal(new_params, params)
  old, new = solver_state(state), solver_state(new_state)
  assert int(new.num_skipped) == int(old.num_skipped) + 1
  unchanged = {"num_skipped": old.num_skipped}
  if name in ("kfac", "kflr", "kfra"):
    # Documented (KFACState.num_skipped): on a refresh step the inverses computed from
    # the unchanged factors may stay; the count does not advance, so they are recomputed.
    unchanged["inverse"] = old.inverse
  fixed = new._replace(**unchanged)
  if new_state is not new:
    fixed = tuple(fixed if s is new else s for s in new_state)
  rel.assert_trees_equal(fixed, state)


@pytest.mark.parametrize("name", list(rel.SOLVERS))
@examples(2)
@given(prior=st.integers(0, 3), row=st.integers(0, 11), column=st.integers(0, 4),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_a_non_finite_batch_leaves_a_chain_bit_identical(name, prior, row, column, bad):
  """Clipping and weight decay around the solver (the plain solver: test_reliability)."""
  tx, step = chained(name)
  params = rel.init_params()
  params, state = rel.train(step, params, tx.init(params), 0, prior)
  x, y = rel.batch(prior)
  after = step(params, state, x.at[row, column].set(bad), y)
  assert_skipped(name, (params, state), after)


# ------------------------------------------------------------ fuzzed bad inputs

# (name, make (x, y) from a good batch, what must happen): "skip" — a counted skip with
# parameters unchanged; "train" — a valid batch, trains normally; otherwise the
# exception type and a pattern its message must match.
BAD_INPUTS = {
    "nan in x": (lambda x, y: (x.at[0, 0].set(jnp.nan), y), "skip"),
    "inf in x": (lambda x, y: (x.at[-1, 2].set(jnp.inf), y), "skip"),
    "label = num_classes": (lambda x, y: (x, y.at[1].set(3)), "skip"),
    "negative label": (lambda x, y: (x, y.at[2].set(-1)), "skip"),
    "nan in one-hot targets": (
        lambda x, y: (x, jax.nn.one_hot(y, 3).at[0, 1].set(jnp.nan)), "skip"),
    "empty batch": (lambda x, y: (x[:0], y[:0]), "empty"),
    "batch of one": (lambda x, y: (x[:1], y[:1]), "train"),
    "too few features": (lambda x, y: (x[:, :4], y), (TypeError, "shape")),
    "labels too short": (lambda x, y: (x, y[:5]), (ValueError, "labels must have shape")),
    "labels with a trailing axis": (lambda x, y: (x, y[:, None]),
                                    (ValueError, "labels must have shape")),
    "float labels": (lambda x, y: (x, y.astype(jnp.float32)), (TypeError, "labels")),
    "complex inputs": (lambda x, y: (x.astype(jnp.complex64), y),
                       (TypeError, "floating point")),
}


def check_bad_input(name, case):
  make, expect = BAD_INPUTS[case]
  tx, step = rel.solver(name)
  params = rel.init_params()
  state = tx.init(params)
  x, y = make(*rel.batch(0))
  if isinstance(expect, tuple):
    error, pattern = expect
    # Raised while tracing: jax.eval_shape runs no XLA computation at all.
    with pytest.raises(error, match=pattern):
      jax.eval_shape(step, params, state, x, y)
    return
  if expect == "empty":
    # Nothing to learn from: a clear error naming the batch, or a counted skip.
    try:
      jax.eval_shape(step, params, state, x, y)
    except (ValueError, TypeError) as error:
      assert "batch" in str(error).lower() or "empty" in str(error).lower(), error
      return
    expect = "skip"
  after = step(params, state, x, y)
  if expect == "skip":
    assert_skipped(name, (params, state), after)
  else:
    assert int(after[1].num_skipped) == 0
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(after[0]))


@examples(10)
@given(name=st.sampled_from(list(rel.SOLVERS)),
       case=st.sampled_from([c for c in BAD_INPUTS if c != "empty batch"]))
def test_fuzzed_bad_inputs_are_clear_errors_or_counted_skips(name, case):
  check_bad_input(name, case)


@pytest.mark.parametrize("name", list(rel.SOLVERS))
def test_an_empty_batch_is_a_clear_error_or_a_counted_skip(name):
  check_bad_input(name, "empty batch")
