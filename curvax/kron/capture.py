"""Finding the Dense / Conv layers of a network and their activations and sensitivities.

Kronecker-factored curvature (kfra_kflr.md §3.2, eq. 19–21) needs, per layer ``λ`` with
``h_λ = W_λ a_{λ−1}``, the layer's inputs ``a_{λ−1}`` and the derivatives of the network
outputs with respect to its pre-activations ``h_λ``. :func:`capture` gets both from one
forward pass of the user's ``predict_fn``:

* every captured layer adds a zero perturbation ``ε_λ`` to its output; the network is
  linearised in ``(params, ε)`` with :func:`curvax.linearize`, so the pullback of an
  output-space vector ``u`` gives the parameter cotangent AND ``J_{h_λ}ᵀ u`` for every
  layer in one backward pass (KFAC's and KFLR's per-layer sensitivities);
* the layer inputs ride along as the linearisation's auxiliary output.

Layers are found in two ways, both by the identity of the parameter arrays they use (so
the parameter pytree may be nested in any way, e.g. Flax ``{'params': ...}`` or an nnx
``State``):

* Flax linen ``nn.Dense`` and ``nn.Conv`` (exact types; N-d convolutions with
  ``feature_group_count=1`` and no mask) are intercepted automatically with
  ``flax.linen.intercept_methods``;
* pure-JAX code marks a layer with :func:`dense` — ``curvax.kron.dense(x, w, b)`` computes
  ``x @ w + b`` and records it when a capture is running (and is a plain matmul
  otherwise). In a ``flax.nnx`` module, call it with the variables' arrays,
  ``curvax.kron.dense(x, self.kernel[...], self.bias[...])``, and build
  ``predict_fn`` as ``lambda p: nnx.merge(graphdef, p)(x)`` (this works with
  ``nnx.Optimizer``; nnx's own ``nnx.Linear`` is not intercepted, and a linen model
  wrapped in ``nnx.bridge.ToNNX`` is captured only if its random-number state is split
  off and merged back in ``predict_fn``).

Parameters that no captured layer uses (LayerNorm scales, embeddings, a layer under
``nn.scan``, a transformed weight) get a fallback block chosen by the optimiser and
trigger a ``warnings.warn``; a model with no captured layer at all is an error.

Convolutions follow KFC (Grosse & Martens 2016): the layer is a Dense layer on input
patches, ``h[n, t] = P[n, t] · vec(W) + b`` with one patch ``P[n, t]`` per output position
``t``, and the positions act as extra rows of the batch (:func:`conv_patches`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import warnings
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from curvax import cvp
from curvax import losses as losses_lib

Array = jax.Array
PyTree = Any


# ------------------------------------------------------------------ static records


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """The lax convolution a Flax ``nn.Conv`` performs (channels-last)."""
  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any  # "SAME" / "VALID" or a tuple of (low, high) pairs
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  pre_pad: Optional[tuple[str, tuple[tuple[int, int], ...]]] = None  # CIRCULAR/REFLECT


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One captured call of a layer (static: known at trace time).

  Attributes:
    kind: ``"dense"`` or ``"conv"``.
    name: the Flax module path, or ``"curvax.kron.dense"`` for a tag.
    kernel, bias: indices of the kernel and bias among ``jax.tree.leaves(params)``
      (``bias`` is ``None`` for a layer without one).
    in_dim: input features of one row (patch size ``∏kernel_size · C_in`` for a conv).
    out_dim: output features.
    input_shape, output_shape: the call's array shapes.
    conv: the convolution's configuration (``None`` for dense).
  """
  kind: str
  name: str
  kernel: int
  bias: Optional[int]
  in_dim: int
  out_dim: int
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  conv: Optional[ConvConfig] = None


@dataclasses.dataclass(frozen=True)
class Block:
  """A Kronecker-factored curvature block: one kernel (and its bias) and its calls.

  A kernel used by several calls (weight sharing) is one block; the calls' rows are
  pooled like the positions of a convolution. The block's input factor has size
  ``in_dim + 1`` with a bias (the appended 1 of kfra_kflr.md footnote 2), ``in_dim``
  without; its output factor has size ``out_dim``.
  """
  kind: str
  name: str
  kernel: int
  bias: Optional[int]
  calls: tuple[int, ...]
  in_dim: int
  out_dim: int

  @property
  def q_dim(self) -> int:
    return self.in_dim + (self.bias is not None)


# ------------------------------------------------------------------ the recorder

_ACTIVE = threading.local()


def _active_recorder():
  stack = getattr(_ACTIVE, "stack", None)
  return stack[-1] if stack else None


class _Recorder:
  """Collects layer calls while ``predict_fn`` runs; adds the perturbations."""

  def __init__(self, leaves: Sequence[Any], perturbations=None):
    self.ids: dict[int, int] = {}
    self.duplicated: set[int] = set()
    for i, leaf in enumerate(leaves):
      if id(leaf) in self.ids:
        self.duplicated.add(id(leaf))
      self.ids.setdefault(id(leaf), i)
    self.perturbations = perturbations
    self.calls: list[LayerCall] = []
    self.inputs: list[Array] = []
    self.outputs: list[Array] = []
    self.skipped: list[tuple[str, str]] = []

  @contextlib.contextmanager
  def active(self):
    stack = getattr(_ACTIVE, "stack", None)
    if stack is None:
      stack = _ACTIVE.stack = []
    stack.append(self)
    try:
      with nn.intercept_methods(self._intercept):
        yield self
    finally:
      stack.pop()

  def _leaf_index(self, array) -> Optional[int]:
    if array is None or id(array) in self.duplicated:
      return None
    return self.ids.get(id(array))

  def record(self, kind, name, x, out, kernel, bias, conv=None):
    """Registers a call and returns its (perturbed) output."""
    k = self._leaf_index(kernel)
    b = self._leaf_index(bias)
    if k is None or (bias is not None and b is None):
      self.skipped.append((name, "its kernel or bias is not a leaf of the params given "
                                 "to predict_fn (a transformed weight, nn.scan/nn.remat, or "
                                 "an array passed twice)"))
      return out
    kernel_shape = jnp.shape(kernel)
    in_dim = math.prod(kernel_shape[:-1])
    out_dim = kernel_shape[-1]
    if jnp.shape(out)[-1] != out_dim:
      self.skipped.append((name, f"output features {jnp.shape(out)[-1]} differ from the "
                                 f"kernel's last axis {out_dim}"))
      return out
    index = len(self.calls)
    self.calls.append(LayerCall(kind, name, k, b, in_dim, out_dim, tuple(jnp.shape(x)),
                                tuple(jnp.shape(out)), conv))
    if self.perturbations is not None:
      if index >= len(self.perturbations):
        raise RuntimeError(
            "curvax.kron: predict_fn called more layers than when it was first traced; "
            "the layers a model calls must not depend on the parameter values.")
      out = out + self.perturbations[index].astype(out.dtype)
    self.inputs.append(x)
    self.outputs.append(out)
    return out

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    kind = {nn.Dense: "dense", nn.Conv: "conv"}.get(type(module))
    if kind is None or context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if module.is_initializing():
      return out
    name = "/".join(str(p) for p in module.path) or type(module).__name__
    x = args[0] if args else kwargs.get("inputs")
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    conv = None
    if kind == "conv":
      conv, reason = _conv_config(module, x)
      if conv is None:
        self.skipped.append((name, reason))
        return out
    return self.record(kind, name, x, out, kernel, bias, conv)


# ------------------------------------------------------------------ explicit tags


def dense(x: Array, w: Array, b: Optional[Array] = None) -> Array:
  """``x @ w + b`` marked as a Dense layer for Kronecker-factored curvature.

  ``w`` (shape ``(in, out)``) and ``b`` (shape ``(out,)``) must be leaves of the params
  the optimiser is given (e.g. ``params["w1"]``, not ``params["w1"].T``); ``x`` has
  shape ``(..., in)`` with the batch on axis 0. Outside a capture this is a plain
  matmul, so the same function serves training, evaluation and ``jax.grad``.
  """
  if jnp.ndim(w) != 2:
    raise ValueError(f"curvax.kron.dense: w must be a 2-D (in, out) kernel, got shape "
                     f"{jnp.shape(w)}.")
  out = jnp.matmul(x, w)
  if b is not None:
    out = out + b
  recorder = _active_recorder()
  if recorder is None:
    return out
  return recorder.record("dense", "curvax.kron.dense", x, out, w, b)


# ------------------------------------------------------------------ convolutions


def _tuple(value, n) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


def _conv_config(module, x) -> tuple[Optional[ConvConfig], str]:
  """The lax call behind a Flax ``nn.Conv``, or ``(None, reason)`` if not supported."""
  kernel_size = _tuple(module.kernel_size, 1 if isinstance(module.kernel_size, int) else
                       len(module.kernel_size))
  rank = len(kernel_size)
  if module.feature_group_count != 1:
    return None, "grouped convolution (feature_group_count != 1)"
  if module.mask is not None:
    return None, "masked convolution"
  if jnp.ndim(x) != rank + 2:
    return None, "input without exactly one batch axis"
  strides = _tuple(module.strides, rank)
  input_dilation = _tuple(module.input_dilation, rank)
  kernel_dilation = _tuple(module.kernel_dilation, rank)
  padding = module.padding
  pre_pad = None
  if isinstance(padding, str):
    padding = padding.upper()
    if padding in ("CIRCULAR", "REFLECT"):
      dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
      pads = tuple(((k - 1) // 2, k // 2) for k in dilated)
      pre_pad = ({"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding], pads)
      padding = "VALID"
    elif padding not in ("SAME", "VALID"):
      return None, f"padding {module.padding!r} is not supported"
  elif isinstance(padding, int):
    padding = ((padding, padding),) * rank
  else:
    try:
      padding = tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))
                      for p in padding)
    except (TypeError, IndexError):
      return None, f"padding {module.padding!r} is not supported"
    if len(padding) != rank:
      return None, f"padding {module.padding!r} is not supported"
  return ConvConfig(kernel_size, strides, padding, input_dilation, kernel_dilation,
                    pre_pad), ""


def conv_patches(x: Array, conv: ConvConfig) -> Array:
  """Input patches of a channels-last convolution: shape ``(B, *out_spatial, F)``.

  Feature ``f`` indexes ``(*kernel_size, C_in)`` in row-major order, the order of the
  kernel reshaped to ``(F, C_out)``, so the layer is ``patches @ kernel.reshape(F, C_out)``
  (+ bias). Computed exactly as the layer computes its output — the same lax
  convolution with an identity kernel.
  """
  if conv.pre_pad is not None:
    mode, pads = conv.pre_pad
    x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), mode=mode)
  rank = len(conv.kernel_size)
  channels = x.shape[-1]
  features = math.prod(conv.kernel_size) * channels
  identity = jnp.eye(features, dtype=x.dtype).reshape(conv.kernel_size
                                                      + (channels, features))
  ndim = rank + 2
  lhs_spec = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs_spec = (ndim - 1, ndim - 2) + tuple(range(0, ndim - 2))
  numbers = lax.ConvDimensionNumbers(lhs_spec, rhs_spec, lhs_spec)
  padding = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
  return lax.conv_general_dilated(
      x, identity, conv.strides, padding, lhs_dilation=conv.input_dilation,
      rhs_dilation=conv.kernel_dilation, dimension_numbers=numbers,
      precision=lax.Precision.HIGHEST)


# ------------------------------------------------------------------ capture


class Capture:
  """One forward pass of a network with its layers captured (see :func:`capture`).

  Attributes:
    lin: a :class:`curvax.cvp.Linearization` of ``(params, perturbations) -> outputs``;
      ``lin.vjp(u)`` returns ``(parameter cotangent, per-call sensitivities J_hᵀ u)``.
    params, leaves: the parameters and ``jax.tree.leaves(params)``.
    calls: the captured :class:`LayerCall` s, in call order.
    blocks: the Kronecker blocks (:class:`Block`), one per captured kernel.
    fallback: indices of the leaves no block covers.
    inputs, outputs: per call, the layer's input ``a`` and (perturbed) output ``h``.
    batch_size: the size of axis 0 of the network outputs.
  """

  def __init__(self, lin, params, calls, blocks, fallback, inputs, outputs, perturbations,
               leaf_names, predict_fn=None):
    self.predict_fn = predict_fn
    self.lin = lin
    self.params = params
    self.leaves = jax.tree.leaves(params)
    self.calls = calls
    self.blocks = blocks
    self.fallback = fallback
    self.inputs = inputs
    self.outputs = outputs
    self.perturbations = perturbations
    self.leaf_names = leaf_names
    self.batch_size = lin.outputs.shape[0]

  @property
  def loss(self) -> losses_lib.Loss:
    return self.lin.loss

  def layer_jaxpr(self):
    """``predict_fn`` as a closed jaxpr of the parameters with outputs
    ``(network outputs, *layer inputs, *layer outputs)`` (one call each, in call order):
    one more trace, no FLOPs — for trace-time checks of what the network computes
    between its layers. Arrays it closes over (a traced batch) are its constants."""
    def run(p):
      recorder = _Recorder(jax.tree.leaves(p))
      with recorder.active():
        out = self.predict_fn(p)
      return out, tuple(recorder.inputs), tuple(recorder.outputs)

    shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf),
                                                            jnp.result_type(leaf)),
                          self.params)
    return jax.make_jaxpr(run)(shapes)

  def grad(self) -> PyTree:
    """``∇f`` with respect to the parameters."""
    return self.lin.batch_mean(self.lin.local_vjp(self.lin.output_grad)[0])

  def jvp(self, tangent: PyTree) -> Array:
    """``J v`` for a parameter-space ``v`` (the perturbations' tangent is zero)."""
    zeros = jax.tree.map(jnp.zeros_like, self.perturbations)
    return self.lin.jvp((tangent, zeros))

  def pullback(self, u: Array) -> tuple[PyTree, tuple[Array, ...]]:
    """``(Jᵀ u, (J_{h_λ}ᵀ u for every call))`` in one backward pass, on this device's
    examples (the estimators average their factors over devices)."""
    param_ct, sensitivities = self.lin.local_vjp(u)
    return param_ct, tuple(sensitivities)

  def activations(self, block: Block) -> Array:
    """The rows ``a`` of the block's input factor, shape ``(rows, q_dim)``.

    Dense rows are the inputs with every axis but the last flattened; conv rows are the
    patches at every output position (KFC). A bias appends a column of ones.
    """
    rows = []
    for i in block.calls:
      call, x = self.calls[i], self.inputs[i]
      if call.kind == "conv":
        x = conv_patches(x, call.conv)
      rows.append(x.reshape(-1, call.in_dim))
    a = jnp.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]
    if block.bias is not None:
      # A pad, not a concatenate with jnp.ones: it keeps a batch-sharded ``a`` sharded.
      a = jnp.pad(a, ((0, 0), (0, 1)), constant_values=1)
    return a

  def sensitivity_rows(self, block: Block, sensitivities: Sequence[Array],
                       batch_dims: int = 0) -> Array:
    """A block's per-row output sensitivities, shape ``(*batch, rows, out_dim)``."""
    rows = []
    for i in block.calls:
      s = sensitivities[i]
      lead = s.shape[:batch_dims]
      rows.append(s.reshape(lead + (-1, block.out_dim)))
    return jnp.concatenate(rows, axis=-2) if len(rows) > 1 else rows[0]


def _blocks(calls: Sequence[LayerCall], leaves, leaf_names, max_factor_dim, slots=None):
  """Groups calls by kernel; returns ``(blocks, used leaves, skipped)``."""
  groups: dict[int, list[int]] = {}
  for i, call in enumerate(calls):
    groups.setdefault(call.kernel, []).append(i)
  blocks, skipped = [], []
  for kernel, members in groups.items():
    first = calls[members[0]]
    name = first.name
    if any(calls[i].bias != first.bias or calls[i].kind != first.kind
           or calls[i].in_dim != first.in_dim for i in members):
      skipped.append((name, "its kernel is shared by layers of different kinds or biases"))
      continue
    block = Block(first.kind, name, kernel, first.bias, tuple(members), first.in_dim,
                  first.out_dim)
    dims = (slot_dims(jnp.shape(leaves[kernel]), max_factor_dim) if slots is None
            else slots[kernel])
    if dims is None or dims != (block.in_dim + 1, block.out_dim):
      limit = (f"max_factor_dim={max_factor_dim}" if slots is None else
               "the optimiser's max_factor_dim")
      skipped.append((name, f"its factors ({block.q_dim}, {block.out_dim}) exceed {limit}"))
      continue
    blocks.append(block)
  used = {b.kernel for b in blocks} | {b.bias for b in blocks if b.bias is not None}
  for block in blocks:
    if block.bias in {b.kernel for b in blocks}:
      raise ValueError(f"curvax.kron: the bias of {block.name} is also a kernel.")
  return tuple(blocks), used, skipped


def slot_dims(shape: Sequence[int], max_factor_dim: Optional[int]
              ) -> Optional[tuple[int, int]]:
  """Factor sizes ``(in + 1, out)`` reserved for a parameter leaf of this shape.

  Every leaf with at least two axes may be a kernel (Dense ``(in, out)``, Conv
  ``(*window, C_in, C_out)``): it gets an input factor of size ``∏shape[:-1] + 1`` (the
  1 for a bias; unused without one) and an output factor of size ``shape[-1]``, unless
  either exceeds ``max_factor_dim``. Optimiser states are allocated from parameter
  shapes alone by this rule, so ``init`` needs no model.
  """
  if len(shape) < 2:
    return None
  q, g = math.prod(shape[:-1]) + 1, shape[-1]
  if max_factor_dim is not None and max(q, g) > max_factor_dim:
    return None
  return q, g


def capture(predict_fn: Callable[[PyTree], Array], params: PyTree, *,
            loss: "losses_lib.Loss | str", targets: Array,
            max_factor_dim: Optional[int] = None, solver: str = "curvax.kron",
            warn: bool = True, axis_name: Optional[str] = None,
            slots: Optional[Sequence[Optional[tuple[int, int]]]] = None) -> Capture:
  """Runs ``predict_fn(params)`` once with its layers captured and linearised.

  Args:
    predict_fn: ``params -> outputs`` on the current batch; its Flax ``nn.Dense`` /
      ``nn.Conv`` layers and :func:`dense` tags are captured.
    params: the parameters (any pytree).
    loss, targets: the loss on the outputs and what it compares them with.
    max_factor_dim: kernels whose factors would be larger are left to the fallback.
    solver: the name used in errors and warnings.
    warn: warn about parameters without a Kronecker block.
    axis_name: the data-parallel axis the batch is split over (see
      :func:`curvax.linearize`); the estimators then average their factors over it.
    slots: per parameter leaf, the factor sizes ``(dim Q̃, dim 𝒢̃)`` reserved in the
      optimiser state, or ``None`` (replaces ``max_factor_dim``: an optimiser reads them
      from its state, whose shapes are static even when ``max_factor_dim`` is an
      injected, traced hyperparameter).

  Raises:
    ValueError: when no layer is found.
  """
  loss = losses_lib.get(loss)
  leaves, _ = jax.tree.flatten(params)
  leaf_names = [jax.tree_util.keystr(path) for path, _ in
                jax.tree_util.tree_flatten_with_path(params)[0]]

  # Pass 1 (abstract, no FLOPs): which layers, with which output shapes.
  found: list[_Recorder] = []

  def discover(p):
    recorder = _Recorder(jax.tree.leaves(p))
    with recorder.active():
      out = predict_fn(p)
    found.append(recorder)
    return out

  jax.eval_shape(discover, params)
  discovered = found[0]
  calls = tuple(discovered.calls)
  blocks, used, skipped = _blocks(calls, leaves, leaf_names, max_factor_dim, slots)
  skipped = discovered.skipped + skipped
  if not blocks:
    detail = "".join(f"\n  {name}: {reason}" for name, reason in skipped)
    raise ValueError(
        f"{solver}: found no Dense or Conv layer in predict_fn, so there is nothing to "
        "Kronecker-factor. Flax linen nn.Dense / nn.Conv layers are found automatically; "
        "in pure JAX or flax.nnx code mark each layer with curvax.kron.dense(x, w, b) "
        "(w and b must be leaves of the params passed to the optimiser)." + detail)
  fallback = tuple(i for i in range(len(leaves)) if i not in used)
  if warn and (fallback or skipped):
    lines = [f"  {name}: {reason}" for name, reason in skipped]
    if fallback:
      lines.append("  parameters without a Kronecker block: "
                   + ", ".join(leaf_names[i] for i in fallback))
    warnings.warn(
        f"{solver}: some parameters are not the kernel/bias of a captured Dense or Conv "
        "layer; they get the optimiser's fallback curvature block (a diagonal estimate "
        "by default, see `fallback=`):\n" + "\n".join(lines), stacklevel=3)

  # Pass 2: the real forward pass, linearised in (params, perturbations).
  zeros = tuple(jnp.zeros(c.output_shape, _float_dtype(leaves[c.kernel])) for c in calls)

  def run(params_and_perturbations):
    p, perturbations = params_and_perturbations
    recorder = _Recorder(jax.tree.leaves(p), perturbations)
    with recorder.active():
      out = predict_fn(p)
    if tuple(recorder.calls) != calls:
      raise RuntimeError(
          f"{solver}: predict_fn called different layers on its second trace; the layers "
          "a model calls must not depend on parameter values.")
    return out, (tuple(recorder.inputs), tuple(recorder.outputs))

  lin = cvp.linearize(run, (params, zeros), loss=loss, targets=targets, has_aux=True,
                       axis_name=axis_name)
  inputs, outputs = lin.aux
  return Capture(lin, params, calls, blocks, fallback, inputs, outputs, zeros, leaf_names,
                 predict_fn)


def _float_dtype(leaf):
  dtype = jnp.result_type(leaf)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
