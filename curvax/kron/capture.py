"""Finding the layers of a network and their activations and sensitivities.

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

* Flax linen ``nn.Dense``, ``nn.DenseGeneral`` (attention projections), ``nn.Conv``
  (N-d, ``feature_group_count=1``, no mask), ``nn.Embed``, ``nn.LayerNorm`` and
  ``nn.RMSNorm`` (exact types; normalisation over the last axis's features) are
  intercepted automatically with ``flax.linen.intercept_methods``;
* pure-JAX code marks a layer with :func:`dense` — ``curvax.kron.dense(x, w, b)`` computes
  ``x @ w + b`` and records it when a capture is running (and is a plain matmul
  otherwise). In a ``flax.nnx`` module, call it with the variables' arrays,
  ``curvax.kron.dense(x, self.kernel[...], self.bias[...])``, and build
  ``predict_fn`` as ``lambda p: nnx.merge(graphdef, p)(x)`` (this works with
  ``nnx.Optimizer``; nnx's own ``nnx.Linear`` is not intercepted, and a linen model
  wrapped in ``nnx.bridge.ToNNX`` is captured only if its random-number state is split
  off and merged back in ``predict_fn``).

Kernels (Dense, Conv, Embed) get Kronecker blocks (:data:`KINDS`); a normalisation
layer's scale and offset, and every vector leaf no captured layer uses (a standalone
bias), get a full block (:mod:`curvax.kron.full_blocks`: the normalisation layer records
its normalised input ``x̂`` in place of ``a``). What is left — a layer under ``nn.scan``,
a transformed weight, a tied embedding, a block larger than ``max_factor_dim`` — gets
the optimiser's fallback block (a diagonal estimate by default), and a
``warnings.warn`` names exactly those parameters and why; a model with no captured layer
at all is an error.

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
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from curvax import cvp
from curvax import losses as losses_lib
from curvax.kron import full_blocks as full_lib

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
    kind: a key of :data:`KINDS` (``"dense"``, ``"conv"`` or ``"embed"``), or ``"norm"``
      (a LayerNorm / RMSNorm: a full block, :mod:`curvax.kron.full_blocks`).
    name: the Flax module path, or ``"curvax.kron.dense"`` for a tag.
    kernel, bias: indices of the kernel and bias among ``jax.tree.leaves(params)``
      (``bias`` is ``None`` for a layer without one); a norm layer's scale and offset
      (either may be ``None``).
    in_dim: input features of one row (patch size ``∏kernel_size · C_in`` for a conv,
      the vocabulary for an embedding, the features for a norm layer).
    out_dim: output features (flattened: ``heads · head_dim`` for an attention
      projection).
    input_shape, output_shape: the call's array shapes (the input with the contracted
      axes last; a norm layer's input is its normalised ``x̂``).
    conv: the convolution's configuration (``None`` for dense).
  """
  kind: str
  name: str
  kernel: Optional[int]
  bias: Optional[int]
  in_dim: int
  out_dim: int
  input_shape: tuple[int, ...]
  output_shape: tuple[int, ...]
  conv: Optional[ConvConfig] = None

  @property
  def param(self) -> int:
    """A parameter leaf of the call (the kernel, else the bias)."""
    return self.kernel if self.kernel is not None else self.bias


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

  @property
  def slot(self) -> "Slot":
    """The state slot this block needs (see :func:`slot_for`)."""
    if KINDS[self.kind].diagonal_input:
      return Slot(self.in_dim, self.out_dim, True)
    return Slot(self.in_dim + 1, self.out_dim, False)


@dataclasses.dataclass(frozen=True)
class Kind:
  """A layer kind's Kronecker structure.

  Attributes:
    diagonal_input: ``Q̃`` is diagonal (stored as a vector): an embedding's one-hot input.
    shared_rows: the kind's rows may be pooled by ``weight_sharing="reduce"`` (an
      embedding's rows always count as examples: reducing one-hot rows would make its
      ``Q̃`` dense).
  """
  diagonal_input: bool = False
  shared_rows: bool = True


# The Kronecker layer kinds: adding one means an entry here, its rows in
# ``Capture._rows`` (or its diagonal in ``Capture.input_factor``) and its interception in
# ``_Recorder._intercept``. Normalisation layers (calls of kind "norm") get full blocks
# instead (curvax.kron.full_blocks).
KINDS = {
    "dense": Kind(),  # nn.Dense, nn.DenseGeneral (attention projections), kron.dense
    "conv": Kind(),  # nn.Conv (KFC: patches as rows)
    "embed": Kind(diagonal_input=True, shared_rows=False),  # nn.Embed
}

WEIGHT_SHARING = ("expand", "reduce")


class Slot(NamedTuple):
  """Factor storage reserved for a parameter leaf: ``Q̃`` of size ``q_dim`` (a vector
  when ``diagonal``), ``𝒢̃`` of size ``g_dim``."""
  q_dim: int
  g_dim: int
  diagonal: bool = False


# ------------------------------------------------------------------ the recorder

_ACTIVE = threading.local()


def _active_recorder():
  stack = getattr(_ACTIVE, "stack", None)
  return stack[-1] if stack else None


class _Recorder:
  """Collects layer calls while ``predict_fn`` runs; adds the perturbations."""

  def __init__(self, leaves: Sequence[Any], perturbations=None,
               rows: Optional[int] = None):
    self.rows = rows  # run the network on the first ``rows`` examples (see capture)
    self.sliced = False
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
    self.unblockable: set[int] = set()  # leaf indices of kernels with an uncaptured use

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
    if array is None or id(array) in self.duplicated :
      return None
    index = self.ids.get(id(array))
    return None if index in self.unblockable else index

  def record(self, kind, name, x, out, kernel, bias, conv=None, out_axes=1):
    """Registers a call and returns its (perturbed) output.

    The kernel's last ``out_axes`` axes are the output features (the trailing axes of
    ``out``), the others the input features (the trailing axes of ``x``; an embedding's
    ``x`` holds indices into the kernel's first axis).
    """
    k = self._leaf_index(kernel)
    b = self._leaf_index(bias)
    if k is None or (bias is not None and b is None):
      self.skipped.append((name, _NOT_A_LEAF))
      return out
    kernel_shape = jnp.shape(kernel)
    in_dim = math.prod(kernel_shape[:-out_axes])
    out_dim = math.prod(kernel_shape[-out_axes:])
    if tuple(jnp.shape(out)[-out_axes:]) != tuple(kernel_shape[-out_axes:]):
      self.skipped.append((name, f"output features {jnp.shape(out)[-out_axes:]} differ "
                                 f"from the kernel's axes {kernel_shape[-out_axes:]}"))
      return out
    return self._append(LayerCall(kind, name, k, b, in_dim, out_dim, tuple(jnp.shape(x)),
                                  tuple(jnp.shape(out)), conv), x, out)

  def record_norm(self, name, x_hat, out, scale, bias):
    """Registers a normalisation layer ``out = x̂ ⊙ scale + bias`` (features last;
    ``scale`` or ``bias`` may be ``None``) and returns its (perturbed) output."""
    s, b = self._leaf_index(scale), self._leaf_index(bias)
    if (scale is not None and s is None) or (bias is not None and b is None):
      self.skipped.append((name, _NOT_A_LEAF.replace("kernel or bias", "scale or offset")))
      return out
    features = jnp.shape(out)[-1]
    if any(p is not None and jnp.shape(p) != (features,) for p in (scale, bias)):
      self.skipped.append((name, "its scale or offset is not a vector over the last axis"))
      return out
    return self._append(LayerCall("norm", name, s, b, features, features,
                                  tuple(jnp.shape(x_hat)), tuple(jnp.shape(out))),
                        x_hat, out)

  def _append(self, call, x, out):
    index = len(self.calls)
    self.calls.append(call)
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
    if self.rows is not None and _is_root(module):
      # Outermost interceptor: every layer below (a root that is itself a layer too)
      # sees the sub-batch.
      args, kwargs = first_rows((args, kwargs), self.rows)
      self.sliced = True
    kind = {nn.Dense: "dense", nn.DenseGeneral: "dense", nn.Conv: "conv",
            nn.Embed: "embed", nn.LayerNorm: "norm", nn.RMSNorm: "norm"}.get(type(module))
    if kind is None:
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    if module.is_initializing():
      return out
    name = "/".join(str(p) for p in module.path) or type(module).__name__
    if kind == "norm":
      return self._intercept_norm(module, name, args, kwargs, out)
    if context.method_name != "__call__":
      if kind == "embed" and context.method_name == "attend":
        # A tied output layer: the table's curvature has a second, uncaptured use.
        table = self.ids.get(id(module.get_variable("params", "embedding")))
        if table is not None:
          self.unblockable.add(table)
        self.skipped.append((name, "its embedding table is also used by attend (tied "
                                   "weights)"))
      return out
    x = args[0] if args else kwargs.get("inputs")
    if kind == "embed":
      return self.record(kind, name, x, out, module.get_variable("params", "embedding"),
                         None)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    conv, out_axes = None, 1
    if kind == "conv":
      conv, reason = _conv_config(module, x)
      if conv is None:
        self.skipped.append((name, reason))
        return out
    elif isinstance(module, nn.DenseGeneral):
      x, out_axes, reason = _dense_general_input(module, x)
      if x is None:
        self.skipped.append((name, reason))
        return out
    return self.record(kind, name, x, out, kernel, bias, conv, out_axes)

  def _intercept_norm(self, module, name, args, kwargs, out):
    """A LayerNorm / RMSNorm: ``x̂`` from the same module without scale and offset (the
    same statistics code, so ``x̂ ⊙ γ + β`` is what the layer computed)."""
    use_bias = getattr(module, "use_bias", False)
    if not (module.use_scale or use_bias):
      return out  # no parameters (also the plain copy below)
    ndim = jnp.ndim(out)
    features = module.feature_axes
    features = (features,) if isinstance(features, int) else tuple(features)
    if tuple(a % ndim for a in features) != (ndim - 1,):
      self.skipped.append((name, f"feature_axes={module.feature_axes!r}: only "
                                 "normalisation with features on the last axis is captured"))
      return out
    if ndim < 2:
      self.skipped.append((name, "input without a batch axis"))
      return out
    fields = dict(use_scale=False, **({"use_bias": False} if use_bias else {}))
    x_hat = module.clone(parent=None, **fields).apply({}, *args, **kwargs)
    scale = module.get_variable("params", "scale") if module.use_scale else None
    bias = module.get_variable("params", "bias") if use_bias else None
    return self.record_norm(name, x_hat, out, scale, bias)


def _is_root(module: nn.Module) -> bool:
  """Whether ``module`` is the model ``apply`` was called on (not a submodule)."""
  return not isinstance(module.parent, nn.Module)


def first_rows(tree: Any, rows: int) -> Any:
  """Every array of ``tree`` with an axis, cut to its first ``rows`` entries (idempotent:
  a cut array is left as it is)."""
  return jax.tree.map(lambda a: a[:rows] if jnp.ndim(a) >= 1 else a, tree)


def on_first_rows(predict_fn: Callable[[PyTree], Array], rows: int
                  ) -> Callable[[PyTree], Array]:
  """``predict_fn`` run on the first ``rows`` examples of its batch: the array arguments
  of the root Flax linen module's calls (batch-major, as ``model.apply(p, x)`` passes
  them) are cut to their first ``rows`` entries before the network runs."""
  def intercept(next_fun, args, kwargs, context):
    if _is_root(context.module):
      args, kwargs = first_rows((args, kwargs), rows)
    return next_fun(*args, **kwargs)

  def run(params):
    with nn.intercept_methods(intercept):
      return predict_fn(params)
  return run


_NOT_A_LEAF = ("its kernel or bias is not a leaf of the params given to predict_fn (a "
               "transformed weight, nn.scan/nn.remat, or an array passed twice)")


def _dense_general_input(module, x):
  """``(x with the contracted axes last, number of output axes, "")`` for an
  ``nn.DenseGeneral`` (e.g. the projections of ``nn.MultiHeadDotProductAttention``:
  ``(B, T, F) → (B, T, heads, head_dim)`` and back), or ``(None, 0, reason)``."""
  if module.batch_dims:
    return None, 0, "DenseGeneral with batch_dims"
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  ndim = jnp.ndim(x)
  axes = tuple(a % ndim for a in axes)
  if 0 in axes:
    return None, 0, "DenseGeneral contracting the batch axis"
  features = ((module.features,) if isinstance(module.features, int)
              else tuple(module.features))
  x = jnp.moveaxis(x, axes, tuple(range(ndim - len(axes), ndim)))
  return x, len(features), ""


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
    full_blocks: the full blocks (:class:`curvax.kron.full_blocks.FullBlock`) of the
      normalisation layers and of the vector leaves no layer uses.
    fallback: indices of the leaves no block covers (the diagonal fallback).
    inputs, outputs: per call, the layer's input ``a`` (a norm layer's ``x̂``) and
      (perturbed) output ``h``.
    batch_size: the size of axis 0 of the network outputs.
  """

  def __init__(self, lin, params, calls, blocks, fallback, inputs, outputs, perturbations,
               leaf_names, predict_fn=None, full_blocks=()):
    self.predict_fn = predict_fn
    self.lin = lin
    self.params = params
    self.leaves = jax.tree.leaves(params)
    self.calls = calls
    self.blocks = blocks
    self.full_blocks = full_blocks
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

  def _rows(self, block: Block, weight_sharing: str = "expand") -> Array:
    """The rows ``a`` of a (non-diagonal) block's input factor, ``(rows, q_dim)``.

    ``"expand"``: every position of every call is a row (dense rows are the inputs with
    every axis but the features flattened, conv rows the patches at every output
    position: KFC); ``"reduce"``: one row per example, the mean of its positions over
    all the block's calls (Eschenhagen et al. 2023, K-FAC-reduce). A bias appends a
    column of ones (after the mean: the mean of ones).
    """
    rows = []
    for i in block.calls:
      call, x = self.calls[i], self.inputs[i]
      if call.kind == "conv":
        x = conv_patches(x, call.conv)
      rows.append(x.reshape(x.shape[0], -1, call.in_dim))
    a = jnp.concatenate(rows, axis=1) if len(rows) > 1 else rows[0]
    if weight_sharing == "reduce" and KINDS[block.kind].shared_rows:
      a = jnp.mean(a, axis=1)
    else:
      a = a.reshape(-1, block.in_dim)
    if block.bias is not None:
      # A pad, not a concatenate with jnp.ones: it keeps a batch-sharded ``a`` sharded.
      a = jnp.pad(a, ((0, 0), (0, 1)), constant_values=1)
    return a

  def activations(self, block: Block, weight_sharing: str = "expand") -> Array:
    """The rows ``a`` of the block's input factor, shape ``(rows, q_dim)`` (see
    :meth:`input_factor`; an embedding's rows are one-hot and never built here)."""
    if KINDS[block.kind].diagonal_input:
      raise ValueError(f"curvax.kron: {block.name} has a diagonal input factor; its "
                       "one-hot rows are not materialised (use input_factor).")
    return self._rows(block, weight_sharing)

  def input_factor(self, block: Block, weight_sharing: str = "expand",
                   gram: Callable[[Array], Array] = lambda a: a.T @ a) -> Array:
    """``Q̃ = (1/R) Σ_r a_r a_rᵀ`` over the block's ``R`` rows (eq. 21), on this device.

    An embedding's rows are one-hot vectors ``e_{t_r}``, so ``Q̃`` is diagonal: the
    frequencies of the indices (a vector), computed without the one-hot rows.
    """
    if KINDS[block.kind].diagonal_input:
      indices = jnp.concatenate([self.inputs[i].reshape(-1) for i in block.calls])
      counts = jnp.zeros(block.in_dim, _float_dtype(self.leaves[block.kernel]))
      return counts.at[indices].add(1) / indices.shape[0]
    a = self._rows(block, weight_sharing)
    return gram(a) / a.shape[0]

  def sensitivity_rows(self, block: Block, sensitivities: Sequence[Array],
                       batch_dims: int = 0, weight_sharing: str = "expand") -> Array:
    """A block's per-row output sensitivities, shape ``(*batch, rows, out_dim)``, rows
    matching :meth:`activations`: with ``"reduce"`` each example's sensitivities are
    summed over its positions (Eschenhagen et al. 2023)."""
    rows = []
    for i in block.calls:
      s = sensitivities[i]
      lead = s.shape[:batch_dims + 1]  # the batch dims and the examples
      rows.append(s.reshape(lead + (-1, block.out_dim)))
    c = jnp.concatenate(rows, axis=-2) if len(rows) > 1 else rows[0]
    if weight_sharing == "reduce" and KINDS[block.kind].shared_rows:
      return jnp.sum(c, axis=-2)
    return c.reshape(c.shape[:batch_dims] + (-1, block.out_dim))


def _blocks(calls: Sequence[LayerCall], leaves, max_factor_dim, slots=None,
            unblockable=frozenset()):
  """Groups calls by kernel; returns ``(blocks, used leaves, skipped)``."""
  groups: dict[int, list[int]] = {}
  for i, call in enumerate(calls):
    if call.kind in KINDS:
      groups.setdefault(call.kernel, []).append(i)
  blocks, skipped = [], []
  for kernel, members in groups.items():
    first = calls[members[0]]
    name = first.name
    if kernel in unblockable:
      continue  # already reported by the recorder
    if any(calls[i].bias != first.bias or calls[i].kind != first.kind
           or calls[i].in_dim != first.in_dim for i in members):
      skipped.append((name, "its kernel is shared by layers of different kinds or biases"))
      continue
    block = Block(first.kind, name, kernel, first.bias, tuple(members), first.in_dim,
                  first.out_dim)
    if slots is None:
      if _exceeds(block.slot, max_factor_dim):
        skipped.append((name, f"its factors ({block.q_dim}, {block.out_dim}) exceed "
                              f"max_factor_dim={max_factor_dim}"))
        continue
    elif slots[kernel] != block.slot:
      reserved = slots[kernel]
      why = ("exceed the optimiser's max_factor_dim" if reserved is None else
             f"do not fit the slots {tuple(reserved)} the optimiser reserved for this "
             "leaf from its shape (see curvax.kron.capture.slot_for)")
      skipped.append((name, f"its factors ({block.q_dim}, {block.out_dim}) {why}"))
      continue
    blocks.append(block)
  used = {b.kernel for b in blocks} | {b.bias for b in blocks if b.bias is not None}
  for block in blocks:
    if block.bias in {b.kernel for b in blocks}:
      raise ValueError(f"curvax.kron: the bias of {block.name} is also a kernel.")
  return tuple(blocks), used, skipped


def _exceeds(slot: Slot, max_factor_dim: Optional[int]) -> bool:
  if max_factor_dim is None:
    return False
  # A diagonal input factor is a vector: only the output factor is a matrix.
  return slot.g_dim > max_factor_dim or (not slot.diagonal and slot.q_dim > max_factor_dim)


_ATTENTION_PROJECTIONS = ("query", "key", "value")


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def slot_for(path: Sequence[Any], shape: Sequence[int], max_factor_dim: Optional[int]
             ) -> Optional[Slot]:
  """Factor storage reserved for a parameter leaf, from its path and shape alone.

  Optimiser states are allocated by this rule, so ``init`` needs no model:

  * a leaf named ``embedding`` with two axes (``nn.Embed``'s table ``(V, F)``): a
    diagonal ``Q̃`` (a vector of size ``V``) and ``𝒢̃`` of size ``F``;
  * a three-axis ``kernel`` under ``query``/``key``/``value`` (the ``nn.DenseGeneral``
    projections of ``nn.MultiHeadDotProductAttention``, ``(F, heads, head_dim)``):
    ``Q̃`` of size ``F + 1`` and ``𝒢̃`` of size ``heads · head_dim``;
  * every other leaf with at least two axes may be a kernel (Dense ``(in, out)``, Conv
    ``(*window, C_in, C_out)``, attention output ``(heads, head_dim, F)``): ``Q̃`` of
    size ``∏shape[:-1] + 1`` (the 1 for a bias; unused without one), ``𝒢̃`` of size
    ``shape[-1]``;

  unless a matrix factor exceeds ``max_factor_dim`` (then ``None``). A layer whose
  factors do not fit its kernel's slot gets the fallback, with a warning. Leaves with at
  most one axis reserve full blocks instead (:func:`full_slots`).
  """
  shape = tuple(shape)
  if len(shape) < 2:
    return None
  names = [_key_name(k) for k in path]
  if names and names[-1] == "embedding" and len(shape) == 2:
    slot = Slot(shape[0], shape[1], True)
  elif (len(shape) == 3 and len(names) >= 2 and names[-1] == "kernel"
        and names[-2] in _ATTENTION_PROJECTIONS):
    slot = Slot(shape[0] + 1, shape[1] * shape[2])
  else:
    slot = Slot(math.prod(shape[:-1]) + 1, shape[-1])
  return None if _exceeds(slot, max_factor_dim) else slot


def slot_dims(shape: Sequence[int], max_factor_dim: Optional[int]
              ) -> Optional[tuple[int, int]]:
  """``(dim Q̃, dim 𝒢̃)`` of :func:`slot_for` for an unnamed leaf of this shape."""
  slot = slot_for((), shape, max_factor_dim)
  return None if slot is None else (slot.q_dim, slot.g_dim)


def leaf_slots(params: PyTree, max_factor_dim: Optional[int]) -> list[Optional[Slot]]:
  """:func:`slot_for` of every leaf, in ``jax.tree.leaves`` order."""
  return [slot_for(path, jnp.shape(leaf), max_factor_dim)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def full_slots(params: PyTree, max_factor_dim: Optional[int]) -> list[Optional[int]]:
  """Per leaf, the size of the full block (:mod:`curvax.kron.full_blocks`) whose matrix
  it stores, or ``None``: blocks of the vector leaves of :func:`full_blocks.vector_groups
  <curvax.kron.full_blocks.vector_groups>` no larger than ``max_factor_dim``."""
  return full_lib.reserved_dims(params, leaf_slots(params, max_factor_dim),
                                max_factor_dim)


def capture(predict_fn: Callable[[PyTree], Array], params: PyTree, *,
            loss: "losses_lib.Loss | str", targets: Array,
            max_factor_dim: Optional[int] = None, solver: str = "curvax.kron",
            warn: bool = True, axis_name: Optional[str] = None,
            slots: Optional[Sequence[Optional[Slot]]] = None,
            full_slots: Optional[Sequence[Optional[int]]] = None,
            rows: Optional[int] = None) -> Capture:
  """Runs ``predict_fn(params)`` once with its layers captured and linearised.

  Args:
    predict_fn: ``params -> outputs`` on the current batch; its Flax layers (see the
      module docstring) and :func:`dense` tags are captured.
    params: the parameters (any pytree).
    loss, targets: the loss on the outputs and what it compares them with.
    max_factor_dim: kernels whose factors, and full blocks that would be larger are
      left to the fallback.
    solver: the name used in errors and warnings.
    warn: warn about parameters without a Kronecker block.
    axis_name: the data-parallel axis the batch is split over (see
      :func:`curvax.linearize`); the estimators then average their factors over it.
    slots: per parameter leaf, the :class:`Slot` reserved in the optimiser state, or
      ``None`` (replaces ``max_factor_dim``: an optimiser reads them
      from its state, whose shapes are static even when ``max_factor_dim`` is an
      injected, traced hyperparameter).
    full_slots: with ``slots``, per leaf, the size of the full block reserved in the
      optimiser state at that leaf, or ``None`` (see :func:`full_slots`; ``None``: no
      full blocks).
    rows: run the network on the first ``rows`` examples of its batch only (a
      curvature sub-batch): the array arguments of the root Flax linen module's calls
      and ``targets`` are cut to their first ``rows`` entries
      (:func:`on_first_rows`). Needs a linen model called on batch-major arrays.

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
    recorder = _Recorder(jax.tree.leaves(p), rows=rows)
    with recorder.active():
      out = predict_fn(p)
    found.append(recorder)
    return out

  out_shape = jax.eval_shape(discover, params)
  discovered = found[0]
  if rows is not None:
    _check_rows(solver, discovered, out_shape, rows)
    targets = first_rows(targets, rows)
  calls = tuple(discovered.calls)
  if slots is None:
    kernel_slots = leaf_slots(params, max_factor_dim)
    full_dims = full_lib.reserved_dims(params, kernel_slots, max_factor_dim)
  else:
    kernel_slots = slots
    full_dims = [None] * len(leaves) if full_slots is None else full_slots
  blocks, used, skipped = _blocks(calls, leaves, max_factor_dim, slots,
                                  frozenset(discovered.unblockable))
  full, covered, full_skipped = full_lib.build(calls, params, leaf_names, kernel_slots,
                                               full_dims, used)
  skipped = discovered.skipped + skipped + full_skipped
  if not blocks and not any(b.kind == "norm" for b in full):
    detail = "".join(f"\n  {name}: {reason}" for name, reason in skipped)
    raise ValueError(
        f"{solver}: found no Dense or Conv layer in predict_fn, so there is nothing to "
        "Kronecker-factor. Flax linen nn.Dense / nn.Conv layers are found automatically; "
        "in pure JAX or flax.nnx code mark each layer with curvax.kron.dense(x, w, b) "
        "(w and b must be leaves of the params passed to the optimiser)." + detail)
  fallback = tuple(i for i in range(len(leaves)) if i not in used | covered)
  if warn and fallback:
    # Exactly the leaves left to the fallback, then the layers that were not captured
    # (a layer's vectors may still have got a full block).
    lines = ["  " + ", ".join(leaf_names[i] for i in fallback)]
    if skipped:
      lines += ["not captured:"] + [f"  {name}: {reason}" for name, reason in skipped]
    warnings.warn(
        f"{solver}: these parameters have no Kronecker or full curvature block and get "
        "the optimiser's fallback curvature block (a diagonal estimate by default, see "
        "`fallback=`):\n" + "\n".join(lines), stacklevel=3)

  # Pass 2: the real forward pass, linearised in (params, perturbations).
  zeros = tuple(jnp.zeros(c.output_shape, _float_dtype(leaves[c.param])) for c in calls)

  def run(params_and_perturbations):
    p, perturbations = params_and_perturbations
    recorder = _Recorder(jax.tree.leaves(p), perturbations, rows=rows)
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
  if rows is not None:
    predict_fn = on_first_rows(predict_fn, rows)
  return Capture(lin, params, calls, blocks, fallback, inputs, outputs, zeros, leaf_names,
                 predict_fn, full)


def _check_rows(solver: str, recorder: _Recorder, out_shape, rows: int) -> None:
  """A sub-batch needs a linen root module whose outputs follow its cut inputs."""
  if not recorder.sliced:
    raise ValueError(
        f"{solver}: curvature_fraction < 1 runs the network on part of the batch by "
        "cutting the inputs of the root Flax linen module, and predict_fn called none "
        "(pure JAX or flax.nnx): pass the curvature sub-batch yourself as "
        "curvature_predict_fn=/curvature_targets= extra arguments.")
  leading = [s.shape[0] for s in jax.tree.leaves(out_shape) if len(s.shape)]
  if any(n != rows for n in leading):
    raise ValueError(
        f"{solver}: with the root module's inputs cut to their first {rows} rows the "
        f"network returned {leading[0] if leading else 'no'} rows; curvature_fraction "
        "needs a model whose outputs are batch-major in its batch-major inputs.")


def _float_dtype(leaf):
  dtype = jnp.result_type(leaf)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
