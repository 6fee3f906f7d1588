"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al. 2024).

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving
and Stabilizing Shampoo using Adam" (2024), Algorithm 3, as the authors' PyTorch
``soap.py`` (github.com/nikhilvyas/SOAP) runs it. For a matrix parameter with gradient
``G`` (``m × n``) and Kronecker factors ``L ≈ E[G Gᵀ]``, ``R ≈ E[Gᵀ G]`` whose
eigenbases are ``Q_L``, ``Q_R``, one step ``t ≥ 1`` is

    G' = Q_Lᵀ G Q_R                                     (rotate into the eigenbasis)
    M ← β₁ M + (1 − β₁) G',   V ← β₂ V + (1 − β₂) G'⊙G'    (Adam's moments there)
    N = Q_L (M / (√V + ε)) Q_Rᵀ                         (rotate Adam's step back)
    θ ← θ − η √(1 − β₂ᵗ)/(1 − β₁ᵗ) · N,   then  θ ← θ − η λ θ     (decoupled decay)
    L ← β_s L + (1 − β_s) G Gᵀ,   R ← β_s R + (1 − β_s) Gᵀ G

and every ``precondition_frequency`` steps the bases are refreshed by one step of power
iteration and a QR decomposition, ``Q ← qr(L Q)``, with ``Q``'s columns first sorted by
the estimated eigenvalues ``diag(Qᵀ L Q)`` (largest first) and ``V`` permuted with them;
``M`` is rotated back with the old bases and into the new ones. A tensor of any rank has
one factor per axis (``G G̃ᵀ`` contracting every other axis), an axis longer than
``max_precond_dim`` keeps the identity for its basis, and ``merge_dims`` first merges
consecutive axes while their product stays ``≤ max_precond_dim``. A 1-D parameter (a
bias, a scale) is plain AdamW unless ``precondition_1d``; a 0-d one is always AdamW.

As in the authors' code:

* the first call only builds the factors from its gradient and takes their eigenbases
  (``eigh``, eigenvalues descending): its update is ZERO (no weight decay either), so
  that no basis is ever used with the gradient it was built from; the Adam step count
  ``t`` (bias correction, the refresh period) starts at the second call;
* ``ε`` is added to ``√V`` and the bias corrections are folded into the step size, so
  in Adam's usual form ``ε`` becomes ``ε/√(1 − β₂ᵗ)`` (``optax.adam`` differs);
* the weight decay is applied after the Adam step, to the stepped parameters, and is
  scaled by the learning rate: ``θ ← (θ − η c N)(1 − η λ)``;
* ``shampoo_beta`` (``β_s``) defaults to ``β₂``; ``normalize_grads`` divides ``N`` by
  its root mean square (per parameter) before the step.

Departures, on purpose:

* the factors and bases are kept in the parameters' dtype, widened to float32 when
  narrower (no ``eigh``/``qr`` in half precision); the authors build them in float32
  whatever the parameters. In float64 they stay float64: in float32 the first real step,
  taken with a gradient close to the one the basis came from, turns rounding noise in
  the near-null directions of the factors into coordinates of size ~1 after Adam's
  normalisation, i.e. steps of size ~η;
* ``M`` is rotated back and forth only when the bases change; the authors rotate it back
  and into the same bases at every step (identical in exact arithmetic, since the bases
  are orthogonal);
* a learning-rate schedule is evaluated at the number of calls so far (``state.count``,
  including the first, zero step), as a PyTorch scheduler stepped after every
  ``optimizer.step()`` would be;
* ``shampoo_beta=None`` stands for the authors' ``-1`` ("use β₂"); any negative number is
  accepted with the same meaning.

Non-finite gradients: SOAP takes gradients, not a loss, so unlike the curvature solvers
it has no guard of its own (nothing to roll back to, no damping to raise); as with
``optax.adamw``, wrap it, ``optax.apply_if_finite(curvax.soap(...), max_consecutive_errors=k)``:
a NaN or inf gradient then leaves the factors, bases and moments untouched and is
counted (``tests/test_soap.py``), where unwrapped it would poison them for good.

The whole step is one function, jittable, with the refreshes chosen by
``jax.lax.switch`` on ``state.count``; the state's structure is fixed at ``init``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from curvax._validation import (ScalarOrSchedule, check_in_range, check_integer,
                                check_positive, concrete_value, static_int, value_at)

PyTree = Any


class SOAPState(NamedTuple):
  """State of :func:`soap`.

  Attributes:
    count: the number of update calls so far (0 before the first). The Adam step of a
      call is ``t = count`` (the first call, ``count = 0``, builds the bases and does not
      step); the learning-rate schedule is evaluated at ``count``.
    exp_avg: Adam's first moment ``M``, kept in the eigenbasis coordinates, in the shape
      and dtype of each parameter.
    exp_avg_sq: Adam's second moment ``V`` in the same coordinates, shape and dtype.
    gg: per parameter a tuple with one entry per (merged) axis: that axis's Kronecker
      factor ``β_s``-averaged ``G G̃ᵀ`` (``d × d``, the paper's ``L`` and ``R``), or
      ``None`` for an axis that is not preconditioned (longer than ``max_precond_dim``;
      a 1-D parameter without ``precondition_1d``). At least float32.
    q: the eigenbases of ``gg`` (orthogonal ``d × d``, columns by decreasing estimated
      eigenvalue), with ``None`` where ``gg`` has ``None``; zeros before the first call.
  """
  count: jax.Array
  exp_avg: PyTree
  exp_avg_sq: PyTree
  gg: PyTree
  q: PyTree


class _Layout(NamedTuple):
  """How one parameter is viewed for preconditioning (static: from its shape)."""
  shape: Tuple[int, ...]          # the parameter's shape
  channels_last: bool             # 4-D, channels_last and merge_dims: axes (0, 3, 1, 2)
  work_shape: Tuple[int, ...]     # after the permutation and the merge
  preconditioned: Tuple[bool, ...]  # per axis of work_shape


def _merged_shape(shape: Sequence[int], max_dim: int) -> Tuple[int, ...]:
  """The authors' ``merge_dims``: consecutive axes are multiplied together while the
  product stays ``<= max_dim``; an axis that alone exceeds it stands on its own."""
  merged, current = [], 1
  for size in shape:
    if current * size > max_dim:
      if current > 1:
        merged.append(current)
        current = size
      else:
        merged.append(size)
    else:
      current *= size
  # A shape of ones (or no axes) still needs one axis to reshape into.
  if current > 1 or not merged:
    merged.append(current)
  return tuple(merged)


def _layout(shape: Tuple[int, ...], *, max_dim: int, merge_dims: bool,
            precondition_1d: bool, channels_last: bool) -> _Layout:
  if len(shape) <= 1:
    # Merging cannot change a vector, and a vector is preconditioned only on request.
    return _Layout(shape, False, shape,
                   tuple(precondition_1d and n <= max_dim for n in shape))
  permute = merge_dims and channels_last and len(shape) == 4
  work = tuple(shape[i] for i in (0, 3, 1, 2)) if permute else shape
  if merge_dims:
    work = _merged_shape(work, max_dim)
  return _Layout(shape, permute, work, tuple(n <= max_dim for n in work))


def _to_work(x: jax.Array, layout: _Layout) -> jax.Array:
  if layout.channels_last:
    x = jnp.transpose(x, (0, 3, 1, 2))
  return x.reshape(layout.work_shape)


def _from_work(x: jax.Array, layout: _Layout) -> jax.Array:
  if layout.channels_last:
    s = layout.shape
    return jnp.transpose(x.reshape((s[0], s[3], s[1], s[2])), (0, 2, 3, 1))
  return x.reshape(layout.shape)


def _rotate(x: jax.Array, bases: Sequence[Optional[jax.Array]], *,
            back: bool) -> jax.Array:
  """``x ×ₖ Qₖᵀ`` over every axis with a basis (into the eigenbasis), or ``x ×ₖ Qₖ``
  with ``back`` (out of it)."""
  for axis, q in enumerate(bases):
    if q is not None:
      x = jnp.moveaxis(jnp.tensordot(x, q, axes=([axis], [1 if back else 0])), -1, axis)
  return x


def _axis_gram(g: jax.Array, axis: int) -> jax.Array:
  """``G G̃ᵀ`` for one axis: the gradient contracted with itself over all other axes."""
  others = [i for i in range(g.ndim) if i != axis]
  return jnp.tensordot(g, g, axes=(others, others))


def _wide(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


class _Settings(NamedTuple):
  """The checked hyperparameters of one :func:`soap` (static, closed over)."""
  learning_rate: ScalarOrSchedule
  b1: Any
  b2: Any
  gg_decay: Any                   # β_s
  eps: Any
  weight_decay: Any
  decays: bool                    # weight_decay is not a known zero
  precondition_frequency: Any
  max_dim: int
  merge_dims: bool
  precondition_1d: bool
  normalize_grads: bool
  channels_last: bool
  correct_bias: bool


def soap(learning_rate: ScalarOrSchedule = 3e-3, *,
         betas: Tuple[float, float] = (0.95, 0.95),
         shampoo_beta: Optional[float] = None,
         eps: float = 1e-8,
         weight_decay: float = 0.01,
         precondition_frequency: int = 10,
         max_precond_dim: int = 10000,
         merge_dims: bool = False,
         precondition_1d: bool = False,
         normalize_grads: bool = False,
         data_format: str = "channels_first",
         correct_bias: bool = True) -> optax.GradientTransformation:
  """SOAP (Vyas et al. 2024, Algorithm 3): Adam in Shampoo's eigenbasis, decoupled decay.

  A plain gradient transformation: ``tx.update(grads, state, params)`` returns the
  updates to add to the parameters (learning rate and weight decay included, as
  ``optax.adamw``). The first call returns zeros (it builds the eigenbases). Defaults are
  the authors'; see the module docstring for the algorithm and the departures.

  Args:
    learning_rate: ``η``: a number (NumPy and 0-d JAX scalars too, so
      ``optax.inject_hyperparams`` works) or an ``optax.Schedule`` evaluated at
      ``state.count``.
    betas: ``(β₁, β₂)`` of Adam's moments, each in ``[0, 1)``.
    shampoo_beta: ``β_s`` of the factors' moving average, in ``[0, 1)``; ``None`` (or a
      negative number, the authors' ``-1``) uses ``β₂``.
    eps: ``ε`` added to ``√V``.
    weight_decay: ``λ``; the decay ``η λ θ`` is applied after the Adam step.
    precondition_frequency: refresh the eigenbases every this many Adam steps (``>= 1``).
    max_precond_dim: an axis longer than this keeps the identity basis (no factor).
    merge_dims: merge consecutive axes while their product is ``<= max_precond_dim``.
    precondition_1d: give 1-D parameters a factor too (otherwise they get AdamW).
    normalize_grads: divide each parameter's rotated-back Adam step by its root mean
      square.
    data_format: ``"channels_first"`` or ``"channels_last"``; with ``merge_dims`` a 4-D
      ``channels_last`` parameter has its axes ordered ``(0, 3, 1, 2)`` before merging,
      as the authors do for NHWC.
    correct_bias: Adam's bias corrections (folded into the step size).

  Raises:
    ValueError: on a hyperparameter outside its range.
    TypeError: on a hyperparameter of the wrong kind.
  """
  s = _settings(learning_rate, betas=betas, shampoo_beta=shampoo_beta, eps=eps,
                weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                max_precond_dim=max_precond_dim, merge_dims=merge_dims,
                precondition_1d=precondition_1d, normalize_grads=normalize_grads,
                data_format=data_format, correct_bias=correct_bias)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)

    def factors(p):
      layout, dtype = _layout_of(p, s), _wide(jnp.result_type(p))
      return tuple(jnp.zeros((n, n), dtype) if pre else None
                   for n, pre in zip(layout.work_shape, layout.preconditioned))

    # Separate zeros for every leaf: a step donating the state must not find one buffer
    # twice.
    return SOAPState(count=jnp.zeros((), jnp.int32),
                     exp_avg=optax.tree.zeros_like(params),
                     exp_avg_sq=optax.tree.zeros_like(params),
                     gg=treedef.unflatten([factors(p) for p in leaves]),
                     q=treedef.unflatten([factors(p) for p in leaves]))

  def update_fn(updates, state, params=None):
    if params is None and s.decays:
      raise ValueError("curvax.soap: params are required for the weight decay: call "
                       "tx.update(grads, state, params), or set weight_decay=0.")
    treedef = jax.tree.structure(state.exp_avg)
    try:
      grads = treedef.flatten_up_to(updates)
    except (ValueError, TypeError) as error:
      raise ValueError(f"curvax.soap: the gradient must have the pytree of the "
                       f"parameters: {error}") from None
    layouts = [_layout_of(g, s) for g in grads]
    exp_avg, exp_avg_sq, gg, q = (treedef.flatten_up_to(tree) for tree in (
        state.exp_avg, state.exp_avg_sq, state.gg, state.q))
    plist = (treedef.flatten_up_to(params) if params is not None
             else [None] * len(grads))
    count = state.count
    dtypes = [m.dtype for m in exp_avg]  # the moments' own, kept in the state
    wide = [_wide(d) for d in dtypes]
    work = [_to_work(g.astype(w), lay) for g, w, lay in zip(grads, wide, layouts)]

    def adam_step(moments):
      return _adam_step(s, count, work, *moments, plist, q, layouts, wide)

    def no_step(moments):
      return ([jnp.zeros(lay.shape, w) for lay, w in zip(layouts, wide)],
              *([x.astype(w) for x, w in zip(moment, wide)] for moment in moments))

    # The first call only builds the bases, so that none is used with its own gradient.
    new_u, exp_avg, exp_avg_sq = jax.lax.cond(count == 0, no_step, adam_step,
                                              (exp_avg, exp_avg_sq))
    gg = [tuple(None if f is None else f + (1 - s.gg_decay) * (_axis_gram(g, k) - f)
                for k, f in enumerate(factors)) for g, factors in zip(work, gg)]
    refresh = (count % s.precondition_frequency) == 0
    branch = jnp.where(count == 0, 1, jnp.where(refresh, 2, 0))
    q, exp_avg, exp_avg_sq = jax.lax.switch(
        branch, (lambda *_: (q, exp_avg, exp_avg_sq),
                 lambda *_: (_eigenbases(gg), exp_avg, exp_avg_sq),
                 lambda *_: _power_iteration(gg, q, exp_avg, exp_avg_sq, layouts)))

    new_state = SOAPState(
        count=optax.safe_increment(count),
        exp_avg=treedef.unflatten([m.astype(d) for m, d in zip(exp_avg, dtypes)]),
        exp_avg_sq=treedef.unflatten([v.astype(d) for v, d in zip(exp_avg_sq, dtypes)]),
        gg=treedef.unflatten(gg),
        q=treedef.unflatten(q))
    return (treedef.unflatten([u.astype(g.dtype) for u, g in zip(new_u, grads)]),
            new_state)

  return optax.GradientTransformation(init_fn, update_fn)


def _settings(learning_rate, *, betas, shampoo_beta, eps, weight_decay,
              precondition_frequency, max_precond_dim, merge_dims, precondition_1d,
              normalize_grads, data_format, correct_bias) -> _Settings:
  """Checks :func:`soap`'s arguments (clear errors at construction, not in the step)."""
  check_positive("learning_rate", learning_rate, schedule=True)
  if not isinstance(betas, (tuple, list)) or len(betas) != 2:
    raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
  b1, b2 = betas
  for name, beta in (("betas[0]", b1), ("betas[1]", b2)):
    _check_decay(name, beta)
  if shampoo_beta is not None:
    check_in_range("shampoo_beta", shampoo_beta, -math.inf, 1)
    known = concrete_value(shampoo_beta)
    if known is not None and known < 0:
      shampoo_beta = None  # the authors' "-1": use beta2
    else:
      _check_decay("shampoo_beta", shampoo_beta)
  check_in_range("eps", eps, 0, math.inf)
  check_in_range("weight_decay", weight_decay, 0, math.inf)
  check_integer("precondition_frequency", precondition_frequency, 1)
  max_dim = static_int("max_precond_dim", max_precond_dim, 10000)
  for name, flag in (("merge_dims", merge_dims), ("precondition_1d", precondition_1d),
                     ("normalize_grads", normalize_grads), ("correct_bias", correct_bias)):
    if not isinstance(flag, (bool, np.bool_)):
      raise TypeError(f"{name} must be a bool, got {flag!r}.")
  if data_format not in ("channels_first", "channels_last"):
    raise ValueError(f"data_format must be 'channels_first' or 'channels_last', got "
                     f"{data_format!r}.")
  return _Settings(
      learning_rate=learning_rate, b1=b1, b2=b2,
      gg_decay=b2 if shampoo_beta is None else shampoo_beta, eps=eps,
      weight_decay=weight_decay, decays=concrete_value(weight_decay) != 0,
      precondition_frequency=precondition_frequency, max_dim=max_dim,
      merge_dims=bool(merge_dims), precondition_1d=bool(precondition_1d),
      normalize_grads=bool(normalize_grads),
      channels_last=data_format == "channels_last", correct_bias=bool(correct_bias))


def _layout_of(x, s: _Settings) -> _Layout:
  return _layout(tuple(jnp.shape(x)), max_dim=s.max_dim, merge_dims=s.merge_dims,
                 precondition_1d=s.precondition_1d, channels_last=s.channels_last)


def _adam_step(s: _Settings, count, work, exp_avg, exp_avg_sq, params, q, layouts,
               wide):
  """Adam's moments and step in the eigenbasis, rotated back, then the decoupled decay;
  returns the updates and the new moments (in the wide dtypes), one list each."""
  rate = value_at(s.learning_rate, count)
  new_u, new_m, new_v = [], [], []
  for g, m, v, p, bases, lay, w in zip(work, exp_avg, exp_avg_sq, params, q, layouts,
                                       wide):
    rotated = _from_work(_rotate(g, bases, back=False), lay)
    m = s.b1 * m.astype(w) + (1 - s.b1) * rotated
    v = s.b2 * v.astype(w) + (1 - s.b2) * rotated**2
    lr = jnp.asarray(rate, w)
    step_size = lr
    if s.correct_bias:
      t = count.astype(w)
      step_size = step_size * jnp.sqrt(1 - s.b2**t) / (1 - s.b1**t)
    direction = _from_work(_rotate(_to_work(m / (jnp.sqrt(v) + s.eps), lay), bases,
                                   back=True), lay)
    if s.normalize_grads:
      direction = direction / (1e-30 + jnp.sqrt(jnp.mean(direction**2)))
    u = -step_size * direction
    if s.decays:
      # After the Adam step and on the stepped parameters, as the authors do.
      u = u - lr * s.weight_decay * (p.astype(w) + u)
    new_u.append(u.astype(w))
    new_m.append(m)
    new_v.append(v)
  return new_u, new_m, new_v


def _eigenbases(gg):
  """Every factor's eigenvectors, columns by decreasing eigenvalue (the first call's
  bases; ``1e-30 I`` as the authors add it)."""
  return [tuple(None if f is None else jnp.flip(
      jnp.linalg.eigh(f + 1e-30 * jnp.eye(f.shape[0], dtype=f.dtype))[1], axis=1)
                for f in factors) for factors in gg]


def _power_iteration(gg, q, exp_avg, exp_avg_sq, layouts):
  """The periodic refresh ``Q ← qr(L Q)``; ``M`` re-projected into the new bases and
  ``V`` permuted with the columns; returns the bases and both moments."""
  new_q, new_m, new_v = [], [], []
  for factors, bases, m, v, lay in zip(gg, q, exp_avg, exp_avg_sq, layouts):
    m = _rotate(_to_work(m, lay), bases, back=True)
    v = _to_work(v, lay)
    fresh = []
    for axis, (f, basis) in enumerate(zip(factors, bases)):
      if f is None:
        fresh.append(None)
        continue
      # Keep the columns ordered by eigenvalue (the estimate diag(Qᵀ L Q)) and V's
      # entries with them, so that V stays attached to its directions.
      order = jnp.argsort(jnp.sum(basis * (f @ basis), axis=0), descending=True)
      v = jnp.take(v, order, axis=axis)
      fresh.append(jnp.linalg.qr(f @ basis[:, order])[0])
    new_q.append(tuple(fresh))
    new_m.append(_from_work(_rotate(m, fresh, back=False), lay))
    new_v.append(_from_work(v, lay))
  return new_q, new_m, new_v


def _check_decay(name: str, value: Any) -> None:
  """``0 <= value < 1`` (a moving average's decay; 1 would never move)."""
  check_in_range(name, value, 0, 1)
  if concrete_value(value) == 1:
    raise ValueError(f"{name} must lie in [0, 1), got {value!r}.")
