"""curvax.soap against a literal NumPy transcription of the authors' SOAP.step.

The reference below follows github.com/nikhilvyas/SOAP ``soap.py`` line by line, in
float64 with plain loops: the axis-0 ``tensordot`` rotations, ``exp_avg`` rotated back
and forth at every step, ``eigh`` (flipped) on the first call, one power-iteration + QR
refresh every ``precondition_frequency`` steps with ``exp_avg_sq`` re-ordered. The
parameter shapes are chosen so that every factor has full rank from the first call: a
rank-deficient factor has no unique eigenbasis, and two correct implementations could
then pick different ones.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import curvax

STEPS = 25


class ReferenceSOAP:
  """The authors' ``SOAP`` optimiser (one parameter group) in NumPy float64."""

  def __init__(self, lr, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8,
               weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
               merge_dims=False, precondition_1d=False, normalize_grads=False,
               data_format="channels_first", correct_bias=True):
    self.lr = lr if callable(lr) else (lambda calls: lr)
    self.b1, self.b2 = betas
    self.shampoo_beta = shampoo_beta if shampoo_beta >= 0 else betas[1]
    self.eps, self.weight_decay = eps, weight_decay
    self.frequency, self.max_dim = precondition_frequency, max_precond_dim
    self.merge_dims, self.precondition_1d = merge_dims, precondition_1d
    self.normalize_grads, self.correct_bias = normalize_grads, correct_bias
    self.channels_last = data_format == "channels_last"
    self.state = {}
    self.calls = 0

  def merge(self, x):
    if self.channels_last and x.ndim == 4:
      x = x.transpose(0, 3, 1, 2)
    new_shape, current = [], 1
    for size in x.shape:
      if current * size > self.max_dim:
        if current > 1:
          new_shape.append(current)
          current = size
        else:
          new_shape.append(size)
          current = 1
      else:
        current = current * size
    if current > 1 or not new_shape:
      new_shape.append(current)
    return x.reshape(new_shape)

  def _rotate(self, x, st, back):
    original = x.shape
    if self.merge_dims:
      if self.channels_last and x.ndim == 4:
        permuted = x.transpose(0, 3, 1, 2).shape
      x = self.merge(x)
    for mat in st["Q"]:
      if mat is not None:
        x = np.tensordot(x, mat, axes=([0], [1 if back else 0]))
      else:
        x = x.transpose(list(range(1, x.ndim)) + [0])
    if self.merge_dims:
      if self.channels_last and len(original) == 4:
        x = x.reshape(permuted).transpose(0, 2, 3, 1)
      else:
        x = x.reshape(original)
    return x

  def project(self, x, st):
    return self._rotate(x, st, back=False)

  def project_back(self, x, st):
    return self._rotate(x, st, back=True)

  def init_preconditioner(self, g, st):
    st["GG"] = []
    if g.ndim == 1:
      if not self.precondition_1d or g.shape[0] > self.max_dim:
        st["GG"].append(None)
      else:
        st["GG"].append(np.zeros((g.shape[0], g.shape[0])))
    else:
      if self.merge_dims:
        g = self.merge(g)
      for size in g.shape:
        st["GG"].append(None if size > self.max_dim else np.zeros((size, size)))
    st["Q"] = None

  def update_preconditioner(self, g, st):
    if st["Q"] is not None:
      st["exp_avg"] = self.project_back(st["exp_avg"], st)
    weight = 1 - self.shampoo_beta
    if g.ndim == 1:
      if self.precondition_1d and g.shape[0] <= self.max_dim:
        st["GG"][0] = st["GG"][0] + weight * (np.outer(g, g) - st["GG"][0])
    else:
      new_g = self.merge(g) if self.merge_dims else g
      for idx, size in enumerate(new_g.shape):
        if size <= self.max_dim:
          others = [i for i in range(new_g.ndim) if i != idx]
          outer = np.tensordot(new_g, new_g, axes=(others, others))
          st["GG"][idx] = st["GG"][idx] + weight * (outer - st["GG"][idx])
    if st["Q"] is None:
      st["Q"] = self.eigenbases(st["GG"])
    if st["step"] > 0 and st["step"] % self.frequency == 0:
      st["Q"] = self.power_iteration(st)
    if st["step"] > 0:
      st["exp_avg"] = self.project(st["exp_avg"], st)

  def eigenbases(self, factors):
    bases = []
    for m in factors:
      if m is None:
        bases.append(None)
        continue
      _, q = np.linalg.eigh(m + 1e-30 * np.eye(m.shape[0]))
      bases.append(np.flip(q, 1))
    return bases

  def power_iteration(self, st):
    original = st["exp_avg_sq"].shape
    if self.channels_last and len(original) == 4:
      permuted = st["exp_avg_sq"].transpose(0, 3, 1, 2).shape
    exp_avg_sq = (self.merge(st["exp_avg_sq"]) if self.merge_dims
                  else st["exp_avg_sq"])
    final = []
    for ind, (m, o) in enumerate(zip(st["GG"], st["Q"])):
      if m is None:
        final.append(None)
        continue
      est_eig = np.diag(o.T @ m @ o)
      sort_idx = np.argsort(-est_eig, kind="stable")
      exp_avg_sq = np.take(exp_avg_sq, sort_idx, axis=ind)
      o = o[:, sort_idx]
      q, _ = np.linalg.qr(m @ o)
      final.append(q)
    if self.merge_dims:
      if self.channels_last and len(original) == 4:
        exp_avg_sq = exp_avg_sq.reshape(permuted).transpose(0, 2, 3, 1)
      else:
        exp_avg_sq = exp_avg_sq.reshape(original)
    st["exp_avg_sq"] = exp_avg_sq
    return final

  def step(self, params, grads):
    lr = self.lr(self.calls)
    self.calls += 1
    new_params = {}
    for name, p in params.items():
      g = grads[name]
      st = self.state.setdefault(name, {})
      if "step" not in st:
        st["step"] = 0
      if "exp_avg" not in st:
        st["exp_avg"] = np.zeros_like(g)
        st["exp_avg_sq"] = np.zeros_like(g)
      if "Q" not in st:
        self.init_preconditioner(g, st)
        self.update_preconditioner(g, st)
        new_params[name] = p
        continue
      g_projected = self.project(g, st)
      st["step"] += 1
      st["exp_avg"] = st["exp_avg"] * self.b1 + g_projected * (1 - self.b1)
      st["exp_avg_sq"] = st["exp_avg_sq"] * self.b2 + g_projected**2 * (1 - self.b2)
      denom = np.sqrt(st["exp_avg_sq"]) + self.eps
      step_size = lr
      if self.correct_bias:
        step_size = step_size * np.sqrt(1 - self.b2**st["step"]) / (1 - self.b1**st["step"])
      norm_grad = self.project_back(st["exp_avg"] / denom, st)
      if self.normalize_grads:
        norm_grad = norm_grad / (1e-30 + np.mean(norm_grad**2)**0.5)
      p = p - step_size * norm_grad
      if self.weight_decay > 0:
        p = p - lr * self.weight_decay * p
      self.update_preconditioner(g, st)
      new_params[name] = p
    return new_params


def _gradients(params, noise):
  """A gradient that depends on the parameters, so that errors compound."""
  return {name: 0.3 * p**3 + p + noise[name] for name, p in params.items()}


# Every factor has full rank at the first call (see the module docstring); "wide" has an
# axis over max_precond_dim=6, "conv" is merged to (6, 6) with merge_dims.
SHAPES = {"kernel": (4, 4), "bias": (4,), "conv": (2, 3, 6), "wide": (7, 4),
          "scalar": ()}
CHANNELS_LAST_SHAPES = {"kernel": (4, 4), "bias": (5,), "scale": (1,),
                        "image": (2, 2, 2, 2), "conv": (2, 3, 6), "wide": (7, 4)}

CONFIGS = {
    "defaults": (SHAPES, dict(learning_rate=0.02, precondition_frequency=3,
                              max_precond_dim=6)),
    "merged_normalized_schedule": (SHAPES, dict(
        learning_rate=lambda c: 0.03 / (1.0 + 0.1 * c), betas=(0.9, 0.99),
        shampoo_beta=0.8, eps=1e-6, weight_decay=0.1, precondition_frequency=3,
        max_precond_dim=6, merge_dims=True, normalize_grads=True, correct_bias=False)),
    "channels_last_1d": (CHANNELS_LAST_SHAPES, dict(
        learning_rate=0.02, precondition_frequency=3, max_precond_dim=4,
        merge_dims=True, precondition_1d=True, data_format="channels_last")),
}


def _reference_kwargs(kwargs):
  kwargs = dict(kwargs)
  kwargs["lr"] = kwargs.pop("learning_rate")
  return kwargs


def _problem(shapes, seed=0):
  rng = np.random.default_rng(seed)
  params = {name: rng.normal(size=shape) for name, shape in shapes.items()}
  noise = [{name: rng.normal(size=shape) for name, shape in shapes.items()}
           for _ in range(STEPS)]
  return params, noise


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_the_authors_algorithm_step_by_step(config):
  shapes, kwargs = CONFIGS[config]
  params, noise = _problem(shapes)
  reference = ReferenceSOAP(**_reference_kwargs(kwargs))
  expected = dict(params)
  with jax.enable_x64(True):
    tx = curvax.soap(**kwargs)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    update = jax.jit(tx.update)
    for k in range(STEPS):
      grads = _gradients(jax.tree.map(np.asarray, ours), noise[k])
      updates, state = update(jax.tree.map(jnp.asarray, grads), state, ours)
      ours = optax.apply_updates(ours, updates)
      expected = reference.step(expected, _gradients(expected, noise[k]))
      for name in shapes:
        np.testing.assert_allclose(np.asarray(ours[name]), expected[name], rtol=1e-10,
                                   atol=1e-12, err_msg=f"{name} after call {k + 1}")
    # The run moved every parameter (a zero step would match a reference that also
    # never moved), and refreshed the bases several times.
    for name in shapes:
      assert np.max(np.abs(expected[name] - params[name])) > 1e-2, name
    assert int(state.count) == STEPS


def test_the_first_update_is_zero_and_builds_orthogonal_bases():
  params, noise = _problem(SHAPES)
  with jax.enable_x64(True):
    tx = curvax.soap(learning_rate=0.1, weight_decay=0.5, max_precond_dim=6)
    params = jax.tree.map(jnp.asarray, params)
    updates, state = tx.update(jax.tree.map(jnp.asarray, noise[0]), tx.init(params),
                               params)
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)
    assert state.gg["wide"][0] is None and state.q["bias"] == (None,)
    for basis in jax.tree.leaves(state.q):
      np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[0]), atol=1e-12)
    # The columns are eigenvectors of the factor, by decreasing eigenvalue.
    factor, basis = state.gg["kernel"][0], state.q["kernel"][0]
    np.testing.assert_allclose(factor, 0.05 * noise[0]["kernel"] @ noise[0]["kernel"].T,
                               rtol=1e-12)
    diagonal = basis.T @ factor @ basis
    np.testing.assert_allclose(diagonal, np.diag(np.diag(diagonal)), atol=1e-12)
    assert np.all(np.diff(np.diag(diagonal)) < 0)
    # The second call steps.
    updates, state = tx.update(jax.tree.map(jnp.asarray, noise[1]), state, params)
    assert all(np.all(leaf != 0) for leaf in jax.tree.leaves(updates))


def _quadratic(params):
  return sum(jnp.sum((p - 1.0)**2 * jnp.arange(1, p.size + 1).reshape(p.shape))
             for p in jax.tree.leaves(params))


def test_in_a_chain_under_jit_without_retracing():
  tx = optax.chain(curvax.soap(learning_rate=0.05, precondition_frequency=2),
                   optax.clip_by_global_norm(1.0))
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w": jax.random.normal(k1, (3, 4)), "b": jax.random.normal(k2, (4,))}
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    loss, grads = jax.value_and_grad(_quadratic)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  first = _quadratic(params)
  for _ in range(60):
    params, state, loss = step(params, state)
  assert len(traces) == 1
  assert _quadratic(params) < 0.15 * first


@pytest.mark.parametrize("kwargs", [
    dict(learning_rate=-1e-3), dict(learning_rate=0.0), dict(betas=(1.0, 0.9)),
    dict(betas=(0.9, -0.1)), dict(betas=(0.9,)), dict(shampoo_beta=1.0),
    dict(eps=-1e-8), dict(weight_decay=-0.01), dict(precondition_frequency=0),
    dict(max_precond_dim=0), dict(data_format="NHWC")])
def test_a_bad_hyperparameter_raises(kwargs):
  with pytest.raises(ValueError):
    curvax.soap(**kwargs)


def test_a_flag_of_the_wrong_kind_and_missing_params_raise():
  with pytest.raises(TypeError, match="merge_dims"):
    curvax.soap(merge_dims="yes")
  tx = curvax.soap()
  params = {"w": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match="params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="pytree"):
    tx.update({"v": jnp.ones((2, 2))}, tx.init(params), params)
  # Without weight decay the params are not needed.
  curvax.soap(weight_decay=0.0).update(params, tx.init(params))


@pytest.mark.parametrize("name", ["float64", "float32", "bfloat16"])
def test_the_dtypes_are_kept(name):
  """float64 stays float64 throughout; factors are at least float32; the moments and
  updates keep the parameters' dtype."""
  with jax.enable_x64(True):
    dtype = jnp.dtype(name)
    params = {"w": jnp.ones((3, 2), dtype), "b": jnp.ones(2, dtype)}
    grads = {"w": jnp.arange(6.0, dtype=dtype).reshape(3, 2) - 2, "b": jnp.ones(2, dtype)}
    tx = curvax.soap(precondition_frequency=1)
    state = tx.init(params)
    for _ in range(3):
      updates, new_state = jax.jit(tx.update)(grads, state, params)
      assert jax.tree.map(lambda x: x.dtype, new_state) == \
          jax.tree.map(lambda x: x.dtype, state)
      state = new_state
    factor = jnp.promote_types(dtype, jnp.float32)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert all(m.dtype == dtype for m in jax.tree.leaves((state.exp_avg,
                                                          state.exp_avg_sq)))
    assert all(f.dtype == factor for f in jax.tree.leaves((state.gg, state.q)))
    assert all(jnp.all(jnp.isfinite(u.astype(jnp.float32)))
               for u in jax.tree.leaves(updates))


def test_the_state_is_donation_safe():
  """Every state leaf its own buffer, and a step donating params and state matches one
  that does not."""
  tx = curvax.soap(learning_rate=0.05, precondition_frequency=2)
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}

  def pointers(tree):
    return [x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)]

  state = tx.init(params)
  assert len(set(pointers(state) + pointers(params))) == len(pointers(state)) + 2

  def step(params, state):
    grads = jax.grad(_quadratic)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  plain = jax.jit(step)
  donating = jax.jit(step, donate_argnums=(0, 1))
  expected = (params, state)
  for _ in range(5):
    expected = plain(*expected)
  fresh = jax.tree.map(jnp.copy, params)
  got = (fresh, tx.init(fresh))
  for _ in range(5):
    got = donating(*got)
  jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_inject_hyperparams_matches_the_plain_optimiser():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  plain = curvax.soap(learning_rate=0.05, precondition_frequency=2)
  injected = optax.inject_hyperparams(
      functools.partial(curvax.soap, precondition_frequency=2))(learning_rate=0.05)

  def run(tx):
    p, state = params, tx.init(params)
    for _ in range(4):
      updates, state = tx.update(jax.grad(_quadratic)(p), state, p)
      p = optax.apply_updates(p, updates)
    return p

  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), run(injected),
               run(plain))


def test_the_state_round_trips_through_flax_serialization():
  """Axes without a preconditioner hold ``None``; the state still serialises."""
  from flax import serialization
  tx = curvax.soap(max_precond_dim=3)
  params = {"w": jnp.ones((2, 4)), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(x.shape) - 1,
                       params)
  _, state = tx.update(grads, tx.init(params), params)
  restored = serialization.from_bytes(tx.init(params), serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert restored.q["w"][1] is None and restored.q["b"] == (None,)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert np.any(np.asarray(restored.q["w"][0]) != 0)


def test_a_non_finite_gradient_is_skipped_by_optax_apply_if_finite():
  """SOAP takes gradients, not a loss, so its guard is optax's: a NaN gradient would
  poison the factors, the bases and the moments for ever; wrapped, it leaves them
  untouched and is counted."""
  params = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(4)}
  grads = jax.grad(_quadratic)
  plain = curvax.soap(learning_rate=0.05, precondition_frequency=2)
  guarded = optax.apply_if_finite(plain, max_consecutive_errors=3)
  state, plain_state = guarded.init(params), plain.init(params)
  for _ in range(3):
    updates, state = guarded.update(grads(params), state, params)
    plain_state = plain.update(grads(params), plain_state, params)[1]
    params = optax.apply_updates(params, updates)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads(params))
  updates, after = guarded.update(bad, state, params)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  jax.tree.map(np.testing.assert_array_equal, after.inner_state, state.inner_state)
  assert int(after.notfinite_count) == 1 and int(after.total_notfinite) == 1
  poisoned = plain.update(bad, plain_state, params)[1]
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(poisoned)
                 if jnp.issubdtype(x.dtype, jnp.floating))
  updates, after = guarded.update(grads(params), after, params)  # and it carries on
  assert int(after.notfinite_count) == 0
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
