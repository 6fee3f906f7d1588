"""Losses on network outputs, with closed-form output-space curvature.

Every curvax solver sees the objective as ``f(w) = L(φ(w), targets)`` where ``φ`` is the
network (``predict_fn``) and ``L`` is one of the losses below. A :class:`Loss` knows, on
the network outputs ``o``:

* ``value(o, t)`` — the scalar objective,
* ``grad(o, t)`` — ``∇_o L``,
* ``hessian_vp(o, t, u)`` — ``H_L u`` (closed forms: curveball.md §2.3, kfra_kflr.md §2),
* ``hessian_sqrt(o, t)`` — ``C`` with ``H_L``'s block of example ``n`` equal to
  ``Σ_k C[k, n] C[k, n]ᵀ`` (KFLR, kfra_kflr.md eq. 23),
* ``sample(key, o, t)`` — targets drawn from the model's predictive distribution, so that
  the covariance of the sampled-target gradients is ``H_L`` (KFAC's Monte-Carlo Fisher).

Reduction convention (the same everywhere in curvax): axis 0 of the outputs is the batch
axis. The per-example loss sums over all other axes, and ``value`` is the MEAN over the
batch: ``L(o) = (1/B) Σ_n ℓ(o_n, t_n)``. Every other method is an exact derivative of that
``value``: ``grad`` and ``hessian_vp`` carry the ``1/B`` factor, and ``hessian_sqrt``
carries ``1/√B``, so the per-example blocks ``Σ_k C[k, n] C[k, n]ᵀ`` are the diagonal
blocks of the Hessian of ``value`` itself (which is block diagonal over examples).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from curvax._sharding import explicit_spec

Array = jax.Array


def _sharded_like_batch(x: Array, outputs: Array) -> Array:
  """``x`` (one row per example) split like the batch axis of ``outputs``.

  Under an explicit mesh ``jax.vmap`` needs every mapped input sharded the same way; this
  is a no-op otherwise.
  """
  spec = explicit_spec(outputs)
  if not spec or spec[0] is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(spec[0]))


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss on network outputs with its output-space derivatives.

  Build one with :func:`squared_error`, :func:`softmax_cross_entropy`,
  :func:`sigmoid_binary_cross_entropy` or :func:`from_fn`. Every method takes batched
  ``outputs`` (batch axis 0) and validates ``targets`` against them at trace time.

  Attributes:
    name: a short identifier, used in error messages.
    per_example: ``(output_n, target_n) -> scalar``, the loss of one example.
    per_example_hvp: ``(output_n, target_n, u_n) -> H_n u_n``, the Hessian of
      ``per_example`` applied to ``u_n``.
    per_example_sqrt: ``(output_n, target_n) -> C_n`` of shape ``(K,) + output_n.shape``
      with ``H_n = Σ_k C_n[k] C_n[k]ᵀ``.
    per_example_sample: ``(key, output_n, target_n) -> target_n`` drawn from the
      predictive distribution, or ``None`` where the loss defines none.
    check_targets: ``(outputs, targets) -> None``; raises ``ValueError``/``TypeError``
      naming the problem.
  """

  name: str
  per_example: Callable[[Array, Array], Array]
  per_example_hvp: Callable[[Array, Array, Array], Array]
  per_example_sqrt: Callable[[Array, Array], Array]
  per_example_sample: Optional[Callable[[Array, Array, Array], Array]]
  check_targets: Callable[[Array, Array], None]

  def _validate(self, outputs, targets):
    outputs = jnp.asarray(outputs)
    targets = jnp.asarray(targets)
    if outputs.ndim == 0:
      raise ValueError(
          f"{self.name}: outputs must have a batch axis 0, got a scalar.")
    if outputs.shape[0] == 0:
      # Before any solver reshapes per-example rows (a zero-size reshape with -1 fails
      # with an unrelated ZeroDivisionError) or averages over none (NaN).
      raise ValueError(f"{self.name}: the batch is empty (batch axis 0 has size 0).")
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
      raise TypeError(
          f"{self.name}: outputs must be floating point, got dtype {outputs.dtype}.")
    self.check_targets(outputs, targets)
    return outputs, targets

  def value(self, outputs: Array, targets: Array) -> Array:
    """``L = (1/B) Σ_n ℓ(o_n, t_n)``."""
    outputs, targets = self._validate(outputs, targets)
    return jnp.mean(jax.vmap(self.per_example)(outputs, targets))

  def per_example_values(self, outputs: Array, targets: Array) -> Array:
    """``ℓ(o_n, t_n)`` for each example, shape ``(B,)``."""
    outputs, targets = self._validate(outputs, targets)
    return jax.vmap(self.per_example)(outputs, targets)

  def value_and_grad(self, outputs: Array, targets: Array) -> tuple[Array, Array]:
    """``(L, ∇_o L)`` in one pass."""
    outputs, targets = self._validate(outputs, targets)
    return jax.value_and_grad(self.value)(outputs, targets)

  def grad(self, outputs: Array, targets: Array) -> Array:
    """``∇_o L`` (includes the ``1/B`` of the batch mean)."""
    return self.value_and_grad(outputs, targets)[1]

  def hessian_vp(self, outputs: Array, targets: Array, u: Array) -> Array:
    """``H_L u`` where ``H_L = ∇²_o L`` is block diagonal over examples."""
    outputs, targets = self._validate(outputs, targets)
    if jnp.shape(u) != outputs.shape:
      raise ValueError(f"{self.name}: hessian_vp vector shape {jnp.shape(u)} does not "
                       f"match outputs shape {outputs.shape}.")
    batch = outputs.shape[0]
    return jax.vmap(self.per_example_hvp)(outputs, targets, u) / batch

  def hessian_sqrt(self, outputs: Array, targets: Array) -> Array:
    """``C`` of shape ``(K,) + outputs.shape``, a square root of ``H_L`` per example.

    ``C[k]`` has the shape of ``outputs`` and holds column ``k`` of every example at once:
    ``C[k, n] = C_n[k] / √B``, and ``H_L``'s diagonal block of example ``n`` is
    ``Σ_k C[k, n] C[k, n]ᵀ`` (off-diagonal blocks are zero). Pushing each ``C[k]`` back
    with one batched ``Jᵀ`` gives KFLR's per-example columns (kfra_kflr.md eq. 23–25,
    with the batch mean folded in).
    """
    outputs, targets = self._validate(outputs, targets)
    batch = outputs.shape[0]
    per_example = jax.vmap(self.per_example_sqrt)(outputs, targets)  # (B, K, ...)
    return jnp.moveaxis(per_example, 1, 0) / jnp.sqrt(jnp.asarray(batch, outputs.dtype))

  def sample(self, key: Array, outputs: Array, targets: Optional[Array] = None) -> Array:
    """Targets drawn from the model's predictive distribution ``p(t | o)``.

    ``targets`` only fixes the format of the result (integer labels or one-hot); it may be
    omitted for losses with one target format. With ``t ~ p(t|o)``,
    ``E[∇ℓ(o, t) ∇ℓ(o, t)ᵀ] = H_ℓ(o)`` per example — the Fisher equals the GGN for these
    exponential-family losses (kfra_kflr.md App. D.3).
    """
    if self.per_example_sample is None:
      raise NotImplementedError(
          f"{self.name}: this loss defines no predictive distribution to sample from; "
          "pass sample_fn= to curvax.losses.from_fn, or use an estimator that does not "
          "sample (KFLR/KFRA instead of KFAC).")
    if targets is None:
      targets = self._default_targets(outputs)
    outputs, targets = self._validate(outputs, targets)
    keys = _sharded_like_batch(jax.random.split(key, outputs.shape[0]), outputs)
    return jax.vmap(self.per_example_sample)(keys, outputs, targets)

  def _default_targets(self, outputs):
    return jnp.zeros_like(outputs)


# --------------------------------------------------------------------------- checks


def _require_float_targets(name):
  def check(outputs, targets):
    if not jnp.issubdtype(targets.dtype, jnp.floating):
      raise TypeError(
          f"{name}: targets must be floating point like the outputs, got dtype "
          f"{targets.dtype} (integer labels belong to softmax_cross_entropy; cast "
          "with .astype(outputs.dtype) if these are real values).")
    if targets.shape != outputs.shape:
      raise ValueError(
          f"{name}: targets shape {targets.shape} does not match outputs shape "
          f"{outputs.shape}.")
  return check


def _check_classification_targets(outputs, targets):
  name = "softmax_cross_entropy"
  if outputs.ndim < 2:
    raise ValueError(
        f"{name}: outputs must be (batch, ..., num_classes) logits, got shape "
        f"{outputs.shape}.")
  if jnp.issubdtype(targets.dtype, jnp.integer):
    if targets.shape != outputs.shape[:-1]:
      raise ValueError(
          f"{name}: integer labels must have shape outputs.shape[:-1] = "
          f"{outputs.shape[:-1]}, got {targets.shape}.")
  elif jnp.issubdtype(targets.dtype, jnp.floating):
    if targets.shape == outputs.shape[:-1]:
      raise TypeError(
          f"{name}: targets of shape {targets.shape} = outputs.shape[:-1] are labels "
          f"stored as {targets.dtype}; cast to int or pass one-hot targets of shape "
          f"{outputs.shape}.")
    if targets.shape != outputs.shape:
      raise ValueError(
          f"{name}: one-hot / soft targets must have the outputs' shape "
          f"{outputs.shape}, got {targets.shape}.")
  else:
    raise TypeError(f"{name}: targets dtype {targets.dtype} is neither integer labels "
                    "nor floating-point class probabilities.")


# ------------------------------------------------------------------ squared error


def squared_error() -> Loss:
  """``ℓ(o, t) = ‖o − t‖²`` (not halved), so ``H_ℓ = 2I`` (curveball.md §2.3).

  Predictive distribution: ``t ~ N(o, ½ I)``, whose score covariance is ``2I = H_ℓ``.
  """

  def per_example(o, t):
    return jnp.sum(jnp.square(o - t))

  def hvp(o, t, u):
    return 2.0 * u

  def sqrt(o, t):
    k = o.size
    eye = jnp.sqrt(jnp.asarray(2.0, o.dtype)) * jnp.eye(k, dtype=o.dtype)
    return eye.reshape((k,) + o.shape)

  def sample(key, o, t):
    noise = jax.random.normal(key, o.shape, o.dtype)
    return o + jnp.sqrt(jnp.asarray(0.5, o.dtype)) * noise

  return Loss("squared_error", per_example, hvp, sqrt, sample,
              _require_float_targets("squared_error"))


# ------------------------------------------------------------ softmax cross-entropy


def _label_cross_entropy(logits, labels):
  """``−log softmax(logits)[label]`` per position; NaN where a label is not a class.

  Computed as optax does, ``logsumexp − logits[label]``: one reduction and a gather,
  no normalised log-probabilities or one-hot targets over all classes, and autodiff's
  gradient is then optax's (softmax, minus one scattered at the label). The validity
  check is one select per position.
  """
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1, mode="clip")[..., 0]
  is_class = (labels >= 0) & (labels < logits.shape[-1])
  return jnp.where(is_class, jax.nn.logsumexp(logits, axis=-1) - picked, jnp.nan)


def softmax_cross_entropy() -> Loss:
  """``ℓ(o, t) = −Σ_c t_c log softmax(o)_c`` over the last axis, summed over the others.

  ``t`` is integer labels (shape ``o.shape[:-1]``) or one-hot / soft class probabilities
  (shape ``o.shape``). With ``p = softmax(o)`` and ``s = Σ_c t_c`` (1 for labels and
  normalised targets), ``H_ℓ = s (diag(p) − ppᵀ)`` (curveball.md §2.3) and
  ``C = √s (diag(√p) − p √pᵀ)`` satisfies ``C Cᵀ = H_ℓ`` because ``Σ_c p_c = 1``.
  Predictive distribution: ``t ~ Categorical(p)``, in the format of the given targets.

  A label that is not a class (``t < 0`` or ``t ≥ num_classes``) makes its example's
  loss, and so the batch's ``value``, NaN (optax's loss is NaN for ``t ≥ num_classes``;
  curvax does not wrap negative labels round either): the solvers' non-finite guard
  then skips the batch and counts it in ``num_skipped``. The gradient stays finite, as
  optax's does. Float targets of shape ``o.shape[:-1]`` (labels stored as floats) are
  refused at trace time.
  """

  def per_example(o, t):
    if jnp.issubdtype(t.dtype, jnp.integer):
      return jnp.sum(_label_cross_entropy(o, t))
    return -jnp.sum(t.astype(o.dtype) * jax.nn.log_softmax(o, axis=-1))

  def target_mass(o, t):
    if jnp.issubdtype(t.dtype, jnp.integer):  # a label is one unit of mass
      return jnp.ones(o.shape[:-1] + (1,), o.dtype)
    return jnp.sum(t.astype(o.dtype), axis=-1, keepdims=True)

  def hvp(o, t, u):
    p = jax.nn.softmax(o, axis=-1)
    return target_mass(o, t) * (p * u - p * jnp.sum(p * u, axis=-1, keepdims=True))

  def sqrt(o, t):
    p = jax.nn.softmax(o, axis=-1)
    sqrt_p = jnp.sqrt(p)
    num_classes = o.shape[-1]
    # Per position: C[..., i, c] = √p_c δ_ic − p_i √p_c (rows i: output, cols c: column).
    per_position = (jnp.eye(num_classes, dtype=o.dtype) * sqrt_p[..., None, :]
                    - p[..., :, None] * sqrt_p[..., None, :])
    per_position = jnp.sqrt(target_mass(o, t))[..., None] * per_position
    # Columns index (position, class); each column is zero outside its position.
    positions = o.shape[:-1]
    num_positions = math.prod(positions)
    flat = per_position.reshape((num_positions, num_classes, num_classes))
    cols = jnp.einsum("pq,pic->qcpi", jnp.eye(num_positions, dtype=o.dtype), flat)
    return cols.reshape((num_positions * num_classes,) + o.shape)

  def sample(key, o, t):
    labels = jax.random.categorical(key, o, axis=-1)
    if jnp.issubdtype(t.dtype, jnp.integer):
      return labels.astype(t.dtype)
    return jax.nn.one_hot(labels, o.shape[-1], dtype=t.dtype)

  return Loss("softmax_cross_entropy", per_example, hvp, sqrt, sample,
              _check_classification_targets)


# ---------------------------------------------------- sigmoid binary cross-entropy


def sigmoid_binary_cross_entropy() -> Loss:
  """``ℓ(o, t) = Σ_i softplus(o_i) − t_i o_i`` (logits ``o``, targets ``t ∈ [0, 1]``).

  ``H_ℓ = diag(p(1 − p))`` with ``p = σ(o)`` (kfra_kflr.md §5), ``C = diag(√(p(1−p)))``.
  Predictive distribution: ``t ~ Bernoulli(p)``.
  """

  def per_example(o, t):
    return jnp.sum(jax.nn.softplus(o) - t * o)

  def hvp(o, t, u):
    p = jax.nn.sigmoid(o)
    return p * (1 - p) * u

  def sqrt(o, t):
    p = jax.nn.sigmoid(o)
    k = o.size
    diag = jnp.sqrt(p * (1 - p)).reshape(-1)
    return (jnp.eye(k, dtype=o.dtype) * diag).reshape((k,) + o.shape)

  def sample(key, o, t):
    return jax.random.bernoulli(key, jax.nn.sigmoid(o)).astype(t.dtype)

  return Loss("sigmoid_binary_cross_entropy", per_example, hvp, sqrt, sample,
              _require_float_targets("sigmoid_binary_cross_entropy"))


# --------------------------------------------------------------------- generic loss


def from_fn(fn: Callable[[Array, Array], Array], *, name: str = "custom",
            sample_fn: Optional[Callable[[Array, Array, Array], Array]] = None,
            check_targets: Optional[Callable[[Array, Array], None]] = None) -> Loss:
  """A loss from any per-example scalar function ``fn(output_n, target_n)``.

  The batch reduction is curvax's: ``value = mean_n fn(o_n, t_n)``. ``H_ℓ u`` is
  forward-over-reverse autodiff; ``hessian_sqrt`` comes from an eigendecomposition of the
  dense per-example ``H_ℓ`` with negative eigenvalues clipped to zero (the PSD part — the
  GGN needs a PSD ``H_L``; for a convex ``fn`` nothing is clipped).

  Args:
    fn: ``(output_n, target_n) -> scalar``, one example (no batch axis).
    name: used in error messages.
    sample_fn: optional ``(key, output_n, target_n) -> target_n`` drawing from the
      predictive distribution (needed only by KFAC).
    check_targets: optional ``(outputs, targets) -> None`` validation; by default the
      targets must have the outputs' batch size.
  """

  def per_example(o, t):
    value = fn(o, t)
    if jnp.ndim(value) != 0:
      raise ValueError(
          f"{name}: the loss function must return a scalar per example, got shape "
          f"{jnp.shape(value)}; reduce inside fn (curvax averages over the batch).")
    return value

  def hvp(o, t, u):
    return jax.jvp(lambda x: jax.grad(per_example)(x, t), (o,), (u,))[1]

  def sqrt(o, t):
    hess = jax.hessian(per_example)(o, t).reshape(o.size, o.size)
    eigval, eigvec = jnp.linalg.eigh(0.5 * (hess + hess.T))
    cols = eigvec * jnp.sqrt(jnp.maximum(eigval, 0.0))
    return cols.T.reshape((o.size,) + o.shape)

  def default_check(outputs, targets):
    if targets.ndim == 0 or targets.shape[0] != outputs.shape[0]:
      raise ValueError(
          f"{name}: targets must have the outputs' batch size {outputs.shape[0]} on "
          f"axis 0, got shape {targets.shape}.")

  return Loss(name, per_example, hvp, sqrt, sample_fn, check_targets or default_check)


_BY_NAME = {
    "squared_error": squared_error,
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
}


def get(loss: "Loss | str") -> Loss:
  """A :class:`Loss` from an instance or one of the names in ``_BY_NAME``."""
  if isinstance(loss, Loss):
    return loss
  if isinstance(loss, str) and loss in _BY_NAME:
    return _BY_NAME[loss]()
  raise ValueError(
      f"loss: unknown loss {loss!r}; expected a curvax.losses.Loss or one of "
      f"{sorted(_BY_NAME)}.")
