"""Curvature-vector products from one linearisation of the network.

The objective is ``f(w) = L(φ(w), t)``: ``φ = predict_fn`` maps parameters to batched
outputs, ``L`` is a :class:`curvax.losses.Loss` (batch mean) and ``t`` the targets. With
``J = ∂φ/∂w`` (outputs × parameters) and ``H_L = ∇²_o L``:

=====================  ===============================================  =================
product                 formula                                          passes
=====================  ===============================================  =================
``jvp(v)``              ``J v``                                          1 tangent
``vjp(u)``              ``Jᵀ u``                                         1 cotangent
``grad()``              ``Jᵀ ∇_o L``                                     1 cotangent
``ggn_vp(v)``           ``G v = Jᵀ H_L J v`` (curveball.md eq. 8–10)     tangent+cotangent
``fused_ggn_vp(z)``     ``Jᵀ (H_L J z + ∇_o L)`` (curveball.md eq. 18)   tangent+cotangent
``fisher_vp(v)``        ``(1/B) Σ_n g_n g_nᵀ v`` (empirical Fisher)      tangent+cotangent
``hessian_vp(v)``       ``∇²f v`` (forward-over-reverse)                 linearised gradient
=====================  ===============================================  =================

:func:`linearize` runs the forward pass once (``jax.linearize``) and keeps its residuals;
every product above reuses them. ``Jᵀ`` is the transpose of that same linear map
(``jax.linear_transpose``), so no product pays for a second forward pass. Under
``jax.jit`` unused products cost nothing (dead-code elimination).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from curvax import losses as losses_lib

Array = jax.Array
PyTree = Any


class FusedProduct(NamedTuple):
  """Result of :meth:`Linearization.fused_ggn_vp`.

  Attributes:
    product: ``Jᵀ (H_L J z + ∇_o L)`` — GGN·z plus the gradient, one backward pass.
    jz: ``J z`` in output space (reusable for quadratic models, curveball.md eq. 19).
    hjz: ``H_L J z``.
  """
  product: PyTree
  jz: Array
  hjz: Array


@jax.tree_util.register_pytree_node_class
class Linearization:
  """The network linearised at ``params`` on one batch, with the loss on top.

  Build with :func:`linearize`. Attributes ``outputs``, ``aux`` (``predict_fn``'s
  auxiliary output, e.g. updated batch statistics), ``loss_value`` and ``output_grad``
  (``∇_o L``) are available without further passes.

  A ``Linearization`` is a pytree whose leaves are the forward pass's residuals, so it
  can cross a ``jax.jit`` boundary: products in a second jitted function reuse the
  first one's forward pass.
  """

  def __init__(self, params, targets, outputs, aux, loss_value, output_grad, jvp_fn,
               loss, predict, axis_name=None):
    self.params = params
    self.targets = targets
    self.outputs = outputs
    self.aux = aux
    self.loss_value = loss_value
    self.output_grad = output_grad
    self._jvp = jvp_fn
    self.loss = loss
    self.predict = predict
    self.axis_name = axis_name
    self._hessian_linearization = None

  def tree_flatten(self):
    children = (self.params, self.targets, self.outputs, self.aux, self.loss_value,
                self.output_grad, self._jvp)
    return children, (self.loss, self.predict, self.axis_name)

  def batch_mean(self, value: PyTree) -> PyTree:
    """Average a per-device batch reduction over ``axis_name`` (identity without one).

    Every result that sums over the batch — parameter-space products, the loss, output
    space dot products — goes through here, so with the batch split evenly over the
    devices of ``axis_name`` each device sees the global-batch value.
    """
    if self.axis_name is None:
      return value
    return jax.lax.pmean(value, self.axis_name)

  def _as_params(self, v: PyTree) -> PyTree:
    """A tangent typed like the (device-varying, under ``axis_name``) parameters."""
    return v if self.axis_name is None else _device_varying(v, self.axis_name)

  def output_vdot(self, a: Array, b: Array) -> Array:
    """``aᵀb`` for output-space arrays (e.g. ``(J d)ᵀ H_L (J d)``), over the global batch."""
    # An elementwise product and a sum, not jnp.vdot: under explicit sharding a dot
    # contracting the sharded batch axis has no defined output sharding.
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return self.batch_mean(jnp.sum(wide(a) * wide(b)))

  def loss_at(self, params: PyTree) -> Array:
    """The objective at other ``params`` on the same batch (one forward pass)."""
    return self.batch_mean(self.loss.value(self.predict(params), self.targets))

  @classmethod
  def tree_unflatten(cls, static, children):
    return cls(*children, *static)

  # -- output-space and Jacobian products ------------------------------------------

  def jvp(self, v: PyTree) -> Array:
    """``J v``: parameter-space tangent to output space."""
    return self._jvp(self._as_params(v))

  def jvp_recomputed(self, v: PyTree) -> Array:
    """``J v`` from a new forward pass (``jax.jvp``) instead of the stored residuals.

    One more forward pass, but nothing from the linearisation has to stay alive for it:
    inside a ``jax.lax.cond`` taken on few steps (CurveBall's λ rule) this keeps the
    compiled step's memory down.
    """
    return jax.jvp(self.predict, (self.params,), (self._as_params(v),))[1]

  def vjp(self, u: Array) -> PyTree:
    """``Jᵀ u``: output-space cotangent pulled back to parameters."""
    return self.batch_mean(self.local_vjp(u))

  def local_vjp(self, u: Array) -> PyTree:
    """This device's ``Jᵀ u``, before :meth:`batch_mean`.

    For inputs that hold per-example values (e.g. a layer's output sensitivities in
    :mod:`curvax.kron`), which must not be averaged over devices.
    """
    (result,) = jax.linear_transpose(self._jvp, self.params)(u)
    return result

  def output_hvp(self, u: Array) -> Array:
    """``H_L u`` in output space (closed form for the canonical losses)."""
    return self.loss.hessian_vp(self.outputs, self.targets, u)

  def grad(self) -> PyTree:
    """``∇f = Jᵀ ∇_o L``."""
    return self.vjp(self.output_grad)

  # -- curvature products ----------------------------------------------------------

  def ggn_vp(self, v: PyTree) -> PyTree:
    """Generalised Gauss-Newton product ``Jᵀ H_L J v`` (curveball.md eq. 9–10)."""
    return self.vjp(self.output_hvp(self.jvp(v)))

  def fused_ggn_vp(self, z: PyTree) -> FusedProduct:
    """``Jᵀ (H_L J z + ∇_o L)``: GGN·z plus gradient in ONE backward pass.

    This is CurveBall's ``Δz − λz`` (curveball.md eq. 18).
    """
    jz = self.jvp(z)
    hjz = self.output_hvp(jz)
    return FusedProduct(self.vjp(hjz + self.output_grad), jz, hjz)

  def fisher_vp(self, v: PyTree) -> PyTree:
    """Empirical Fisher product ``(1/B) Σ_n g_n g_nᵀ v`` with per-example gradients ``g_n``.

    With ``r_n = ∇ℓ(o_n, t_n)`` (output space), ``g_n = J_nᵀ r_n`` and so
    ``F v = Jᵀ u`` with ``u_n = r_n (r_n · (J v)_n) / B`` — one tangent, one cotangent.
    """
    batch = self.outputs.shape[0]
    # output_grad carries the batch mean's 1/B; per-example gradients are B times it.
    per_example = self.output_grad * batch
    jv = self.jvp(v)
    axes = tuple(range(1, jv.ndim))
    dots = jnp.sum(per_example * jv, axis=axes, keepdims=True)
    return self.vjp(per_example * dots / batch)

  def hessian_vp(self, v: PyTree) -> PyTree:
    """Exact Hessian product ``∇²f v`` (forward-over-reverse).

    The gradient map is linearised once per :class:`Linearization` and reused by every
    later call (e.g. across conjugate-gradient iterations).
    """
    if self._hessian_linearization is None:
      objective = lambda p: self.loss.value(self.predict(p), self.targets)
      _, self._hessian_linearization = jax.linearize(jax.grad(objective), self.params)
    return self.batch_mean(self._hessian_linearization(self._as_params(v)))

  def product(self, curvature: str) -> Callable[[PyTree], PyTree]:
    """The product named ``"ggn"``, ``"hessian"`` or ``"fisher"``."""
    products = {"ggn": self.ggn_vp, "hessian": self.hessian_vp, "fisher": self.fisher_vp}
    if curvature not in products:
      raise ValueError(
          f"curvature: unknown curvature {curvature!r}; expected one of {sorted(products)}.")
    return products[curvature]


def linearize(predict_fn: Callable[[PyTree], Any], params: PyTree, *,
              loss: "losses_lib.Loss | str", targets: Array,
              has_aux: bool = False, axis_name: Optional[str] = None) -> Linearization:
  """Linearise ``predict_fn`` at ``params`` (one forward pass) for curvature products.

  Args:
    predict_fn: ``params -> outputs`` on the current batch (e.g.
      ``lambda p: model.apply(p, x)``), or ``params -> (outputs, aux)`` with
      ``has_aux=True`` (e.g. Flax BatchNorm's updated ``batch_stats``).
    params: the parameter pytree.
    loss: a :class:`curvax.losses.Loss` or its name.
    targets: what the loss compares the outputs with.
    has_aux: whether ``predict_fn`` returns ``(outputs, aux)``.
    axis_name: the mapped axis (``shard_map`` / ``pmap``) the batch is split over, evenly;
      every batch reduction is then averaged over it (:meth:`Linearization.batch_mean`).
      Not needed under plain ``jax.jit`` with sharded inputs, where XLA partitions the
      global computation itself.
  """
  loss = losses_lib.get(loss)
  if axis_name is not None:
    # Mark the replicated parameters as device-varying: otherwise shard_map's transpose
    # would already sum the cotangents over the axis, and batch_mean would be applied
    # to a sum instead of to each device's own contribution.
    params = _device_varying(params, axis_name)
  if has_aux:
    outputs, jvp_fn, aux = jax.linearize(predict_fn, params, has_aux=True)
    predict = lambda p: predict_fn(p)[0]
  else:
    outputs, jvp_fn = jax.linearize(predict_fn, params)
    aux, predict = None, predict_fn
  loss_value, output_grad = loss.value_and_grad(outputs, targets)
  if axis_name is not None:
    loss_value = jax.lax.pmean(loss_value, axis_name)
  return Linearization(params, targets, outputs, aux, loss_value, output_grad, jvp_fn,
                       loss, predict, axis_name)


def _device_varying(tree: PyTree, axis_name: str) -> PyTree:
  """``tree`` typed as varying over ``axis_name`` (a no-op where it already is)."""
  def cast(x):
    if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
      return x
    return jax.lax.pcast(x, axis_name, to="varying")
  return jax.tree.map(cast, tree)


def ggn_vp(predict_fn, params, v, *, loss, targets) -> PyTree:
  """``Jᵀ H_L J v`` at ``params`` (see :meth:`Linearization.ggn_vp`)."""
  return linearize(predict_fn, params, loss=loss, targets=targets).ggn_vp(v)


def hessian_vp(predict_fn, params, v, *, loss, targets) -> PyTree:
  """``∇²f v`` at ``params`` (see :meth:`Linearization.hessian_vp`)."""
  loss = losses_lib.get(loss)
  objective = lambda p: loss.value(predict_fn(p), targets)
  return jax.jvp(jax.grad(objective), (params,), (v,))[1]


# ------------------------------------------------------------------ spectral helpers


def top_eigenvalue(matvec: Callable[[PyTree], PyTree], like: PyTree, key: Array, *,
                   num_iters: int = 20) -> tuple[Array, PyTree]:
  """Largest-magnitude eigenvalue of a symmetric operator by power iteration.

  Returns ``(eigenvalue, unit eigenvector)``; the eigenvalue is the Rayleigh quotient
  ``vᵀ A v`` of the last iterate. ``like`` gives the pytree structure and dtypes.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}.")

  def normalise(v):
    return optax.tree.scale(1.0 / (optax.tree.norm(v) + 1e-30), v)

  def step(_, carry):
    v, _ = carry
    av = matvec(v)
    return normalise(av), optax.tree.vdot(v, av)

  v0 = normalise(optax.tree.random_like(key, like, jax.random.normal))
  zero = jnp.zeros((), jnp.result_type(*jax.tree.leaves(like)))
  v, rayleigh = jax.lax.fori_loop(0, num_iters, step, (v0, zero))
  return rayleigh, v


def sharpness(predict_fn, params, *, loss, targets, key: Array,
              curvature: str = "ggn", num_iters: int = 20) -> Array:
  """Top eigenvalue of the GGN (default), Hessian or empirical Fisher at ``params``.

  One linearisation serves all ``num_iters`` products. For the Hessian this is the
  eigenvalue of largest magnitude, which may be negative.
  """
  lin = linearize(predict_fn, params, loss=loss, targets=targets)
  value, _ = top_eigenvalue(lin.product(curvature), params, key, num_iters=num_iters)
  return value


# ------------------------------------------------------- dense matrices (tiny models)


def dense_matrix(matvec: Callable[[PyTree], PyTree], like: PyTree) -> Array:
  """The ``(n, n)`` matrix of a linear operator on pytrees shaped like ``like``.

  Columns are ``matvec`` of the basis vectors of the flattened parameters
  (``jax.flatten_util.ravel_pytree`` order). Meant for tiny models: tests and teaching.
  """
  flat, unravel = ravel_pytree(like)
  basis = jnp.eye(flat.size, dtype=flat.dtype)
  column = lambda e: ravel_pytree(matvec(unravel(e)))[0]
  return jax.vmap(column, out_axes=1)(basis)


def dense_curvature(predict_fn, params, *, loss, targets, curvature: str = "ggn",
                    has_aux: bool = False) -> Array:
  """Dense GGN / Hessian / empirical Fisher of a tiny model, in flattened-parameter order."""
  lin = linearize(predict_fn, params, loss=loss, targets=targets, has_aux=has_aux)
  return dense_matrix(lin.product(curvature), params)
