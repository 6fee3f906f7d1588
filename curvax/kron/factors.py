"""Estimates of the Kronecker factors ``Q̃_λ`` and ``𝒢̃_λ`` (kfra_kflr.md §3.2–3.5).

Each layer's GGN block is approximated as ``E[Q_λ] ⊗ E[𝒢_λ]`` (eq. 20) in the layout of
the kernel reshaped to ``(in, out)`` (bias as an appended input row), flattened row-major:

* ``Q̃ = (1/R) Σ_r a_r a_rᵀ`` over the layer's ``R`` input rows (eq. 21; rows are the
  examples, times the positions of a convolution or sequence);
* ``𝒢̃`` by one of three estimators, all written as ``Σ_{k, r} c_{k,r} c_{k,r}ᵀ`` over
  the rows of per-layer sensitivities ``c = J_{h_λ}ᵀ u_k`` of output-space columns
  ``u_k`` with ``Σ_k u_k u_kᵀ`` equal (or equal in expectation) to the per-example
  blocks of ``H_L`` — curvax losses average over the batch, so ``H_L`` carries ``1/B``
  and no further ``1/B`` appears:

  - :func:`kflr`: ``u_k`` are the ``K`` columns of ``loss.hessian_sqrt`` (eq. 23–25),
    pushed back with one vmapped backward pass — exact ``E[𝒢_λ]``;
  - :func:`kfac`: ``u = √B ∇_o L(o, t̃)`` for targets ``t̃`` sampled from the model
    (``loss.sample``), one backward pass per sample — the Monte-Carlo Fisher
    (App. D.3, eq. 59), equal to KFLR in expectation;
  - :func:`kfra`: no backward pass at all — the recursion
    ``𝒢̃_{λ−1} = (W_λᵀ 𝒢̃_λ W_λ) ⊙ (1/B) Σ_n A′_n A′_nᵀ`` of Algorithm 1 (eq. 26),
    started from ``𝒢̃_L = E[H_L]``, for chains of Dense layers with elementwise
    activations.

With one example (``B = 1``, one row per layer) KFLR and KFRA give exactly the diagonal
GGN blocks ``Q_λ ⊗ 𝒢_λ`` (eq. 19, App. D.4).

The same columns give the full blocks of :mod:`curvax.kron.full_blocks` (KFAC/KFLR
only): a LayerNorm / RMSNorm's ``Σ_{k,n} g g ᵀ`` from its exact per-example gradients
``g = [Σ_t x̂ ⊙ s ; Σ_t s]``, and a vector leaf no layer uses ``Σ_k c_k c_kᵀ`` from the
sign-mixed parameter cotangent ``c_k = Jᵀ (r_k ⊙ u_k)`` (a random sign ``r`` per column
and example: ``E[c_k c_kᵀ] = Σ_n J_nᵀ u_{n,k} u_{n,k}ᵀ J_n``). Parameters outside every
block (see :mod:`curvax.kron.capture`) get the diagonal of the latter,
``Σ_k (Jᵀ (r_k ⊙ u_k))²``, whose expectation is ``diag(Σ_n J_nᵀ H_n J_n)``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from curvax._sharding import explicit_spec
from curvax.kron import full_blocks as full_lib
from curvax.kron.capture import Capture

Array = jax.Array
Activation = Optional[Callable[[Array], Array]]


class Estimate(NamedTuple):
  """One batch's factor estimates.

  Attributes:
    q, g: per block of ``capture.blocks``, ``Q̃`` (``(q_dim, q_dim)``) and ``𝒢̃``
      (``(out_dim, out_dim)``).
    diag: per leaf of ``capture.fallback``, a diagonal curvature estimate (leaf-shaped),
      or ``None`` where the estimator provides none.
    full: per block of ``capture.full_blocks``, its ``(dim, dim)`` curvature matrix.
    examples: per block of ``capture.blocks``, the per-example rows its exact
      per-example gradients are made of — ``(a, c)`` with the inputs ``a`` of shape
      ``(B, T, q_dim)`` (bias column included) and the sensitivities ``c`` of shape
      ``(K, B, T, out_dim)``, ``T`` the positions an example shares the kernel over —
      or ``None`` (an embedding); ``()`` unless asked for (``examples=True``, for
      :mod:`curvax.kron.ekfac`).
  """
  q: tuple
  g: tuple
  diag: Optional[tuple]
  full: tuple = ()
  examples: tuple = ()


_GRAM_PANEL = 250  # columns per panel of a blocked Gram product


def row_gram(a: Array) -> Array:
  """``aᵀa``, summed over the rows of ``a`` (examples and positions).

  A wide ``a`` is split into column panels ``a = [a₁ … a_p]`` and only the blocks
  ``a_iᵀa_j`` with ``i ≤ j`` are multiplied, the others being their transposes
  (``(p + 1)/2p`` of the flops: the symmetric rank-k update that XLA lacks). On the
  2-core CPU this makes a 1000 × 1001 factor ~20 % cheaper. Under ``jax.jit`` with the
  batch sharded over an *explicit* mesh axis the rows are sharded, and JAX asks for the
  sharding of a product that contracts them: the factor is replicated (one product).
  """
  if any(axis is not None for axis in explicit_spec(a)):
    return jnp.matmul(a.T, a, out_sharding=jax.sharding.PartitionSpec())
  n = a.shape[-1]
  panels = max(1, round(n / _GRAM_PANEL))
  if panels == 1:
    return a.T @ a
  edges = np.linspace(0, n, panels + 1).round().astype(int)
  cols = [a[:, lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]
  upper = {(i, j): cols[i].T @ cols[j] for i in range(panels) for j in range(i, panels)}
  return jnp.concatenate(
      [jnp.concatenate([upper[i, j] if i <= j else upper[j, i].T for j in range(panels)],
                       axis=1) for i in range(panels)], axis=0)


def input_factors(capture: Capture, weight_sharing: str = "expand") -> tuple:
  """``Q̃_λ = (1/R) Σ_r a_r a_rᵀ`` for every block (eq. 21, bias as an appended 1), rows
  as :meth:`Capture.input_factor` (``weight_sharing``: see :func:`from_columns`)."""
  out = tuple(capture.input_factor(block, weight_sharing, gram=row_gram)
              for block in capture.blocks)
  return capture.lin.batch_mean(out)


def example_rows(capture: Capture, block, sensitivities) -> Optional[tuple[Array, Array]]:
  """``(a, c)`` of :attr:`Estimate.examples` for one block: every position of an
  example is kept apart (whatever ``weight_sharing`` says), so that
  ``Σ_t a_{n,t} c_{k,n,t}ᵀ`` is example ``n``'s exact gradient for column ``k``."""
  if block.slot.diagonal:
    return None
  batch = capture.batch_size
  a = capture.activations(block, "expand")
  c = capture.sensitivity_rows(block, sensitivities, batch_dims=1, weight_sharing="expand")
  return a.reshape(batch, -1, a.shape[-1]), c.reshape(c.shape[0], batch, -1, c.shape[-1])


def from_columns(capture: Capture, columns: Array, *, key: Optional[Array] = None,
                 fallback_diagonal: bool = True, weight_sharing: str = "expand",
                 examples: bool = False) -> Estimate:
  """Factors from output-space columns ``u_k`` (shape ``(K, *outputs.shape)``).

  ``𝒢̃ = Σ_{k, rows} (J_hᵀ u_k)(J_hᵀ u_k)ᵀ`` — one vmapped backward pass.

  A kernel applied at several positions of an example (a sequence, the patches of a
  convolution, several calls) is one block; Eschenhagen et al. 2023 (§3) give two
  ways to form its rows:

  * ``"expand"`` (K-FAC-expand): every position is a row,
    ``Q̃ = (1/(BR)) Σ_{n,r} a_{n,r} a_{n,r}ᵀ``, ``𝒢̃ = Σ_k Σ_{n,r} c_{k,n,r} c_{k,n,r}ᵀ``
    — exact for deep linear networks whose loss treats the positions as examples
    (a per-position loss);
  * ``"reduce"`` (K-FAC-reduce): one row per example, the inputs averaged and the
    sensitivities summed over its positions, ``Q̃ = (1/B) Σ_n â_n â_nᵀ`` with
    ``â_n = (1/R) Σ_r a_{n,r}``, ``𝒢̃ = Σ_k Σ_n ĉ_{k,n} ĉ_{k,n}ᵀ`` with
    ``ĉ_{k,n} = Σ_r c_{k,n,r}`` — exact for deep linear networks that reduce the
    shared axis before the output (e.g. mean pooling), and ``R`` times fewer rows.

  (The ``1/B`` of the paper's ``Q̃`` sits in ``H_L`` here: curvax losses average over the
  batch.) Embedding rows are one-hot and always expanded (a diagonal ``Q̃``). The full
  blocks of normalisation layers use exact per-example gradients, summed over positions
  whatever ``weight_sharing`` says (:mod:`curvax.kron.full_blocks`). With ``key`` and
  fallback leaves or vector blocks, every column is multiplied by a random sign per
  example first (this leaves ``𝒢̃`` and the norm blocks unchanged when rows do not mix
  examples) so that the parameter cotangents' outer products (squares, for the fallback
  diagonal) estimate their GGN blocks without cross-example terms; without ``key`` they
  include those terms (exact for one example only).
  """
  want_diag = fallback_diagonal and bool(capture.fallback)
  mixed = any(block.kind == "vector" for block in capture.full_blocks)
  if (want_diag or mixed) and key is not None:
    batch = capture.batch_size
    signs = jax.random.rademacher(key, (columns.shape[0], batch), columns.dtype)
    columns = columns * signs.reshape(signs.shape + (1,) * (columns.ndim - 2))
  param_ct, sensitivities = jax.vmap(capture.pullback)(columns)
  g = []
  for block in capture.blocks:
    c = capture.sensitivity_rows(block, sensitivities, batch_dims=1,
                                 weight_sharing=weight_sharing)
    c = c.reshape(-1, block.out_dim)
    g.append(row_gram(c))
  leaves = jax.tree.leaves(param_ct)
  full = []
  for block in capture.full_blocks:
    if block.kind == "norm":
      rows = full_lib.norm_gradients(block, capture.inputs, sensitivities, batch_dims=1)
    else:
      rows = full_lib.vector_rows(block, leaves, batch_dims=1)
    full.append(row_gram(rows.reshape(-1, block.dim)))
  diag = None
  if want_diag:
    diag = tuple(jnp.sum(jnp.square(leaves[i]), axis=0) for i in capture.fallback)
  # Each device's columns carry its own 1/√B: averaging gives the global-batch factors.
  g, diag, full = capture.lin.batch_mean((tuple(g), diag, tuple(full)))
  rows = (tuple(example_rows(capture, block, sensitivities) for block in capture.blocks)
          if examples else ())
  return Estimate(input_factors(capture, weight_sharing), g, diag, full, rows)


def kflr(capture: Capture, key: Optional[Array] = None, *,
         fallback_diagonal: bool = True, weight_sharing: str = "expand",
         examples: bool = False) -> Estimate:
  """KFLR: the exact ``E[𝒢_λ]`` from the ``K`` columns of ``H_L``'s square root.

  kfra_kflr.md eq. 23–25: ``C_λ^k = B_λ W_{λ+1}ᵀ C_{λ+1}^k`` is the pullback of the
  output column ``C_L^k`` — computed for every layer type by the backward pass.
  """
  lin = capture.lin
  columns = lin.loss.hessian_sqrt(lin.outputs, lin.targets)
  return from_columns(capture, columns, key=key, fallback_diagonal=fallback_diagonal,
                      weight_sharing=weight_sharing, examples=examples)


def sampled_columns(capture: Capture, sampled_targets: Array) -> Array:
  """``√B ∇_o L(o, t̃)``: one output column whose outer product estimates ``H_L``.

  ``loss.grad`` carries the batch mean's ``1/B``; per example the column is
  ``∇ℓ(o_n, t̃_n) / √B``, so ``E_t̃[Σ c cᵀ]`` matches ``hessian_sqrt``'s scaling.
  """
  lin = capture.lin
  grad = lin.loss.grad(lin.outputs, sampled_targets)
  return grad * jnp.sqrt(jnp.asarray(capture.batch_size, grad.dtype))


def kfac(capture: Capture, key: Array, *, num_samples: int = 1,
         fallback_diagonal: bool = True, weight_sharing: str = "expand",
         examples: bool = False) -> Estimate:
  """KFAC: the Monte-Carlo Fisher with targets sampled from the model (App. D.3).

  ``𝒢̃ = (1/S) Σ_s Σ_n ∇_{h_n} ℓ(o_n, t̃_{s,n}) ∇_{h_n} ℓ(o_n, t̃_{s,n})ᵀ / B`` with
  ``t̃ ~ p(t | o)`` (eq. 59); its expectation is KFLR's factor for the exponential-family
  losses, where the Fisher equals the GGN (App. D.2).
  """
  lin = capture.lin
  sample_key, sign_key = jax.random.split(key)
  if lin.axis_name is not None:
    sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(lin.axis_name))
  keys = jax.random.split(sample_key, num_samples)
  targets = jax.vmap(lambda k: lin.loss.sample(k, lin.outputs, lin.targets))(keys)
  columns = jax.vmap(lambda t: sampled_columns(capture, t))(targets)
  columns = columns / jnp.sqrt(jnp.asarray(num_samples, columns.dtype))
  return from_columns(capture, columns, key=sign_key, fallback_diagonal=fallback_diagonal,
                      weight_sharing=weight_sharing, examples=examples)


# ------------------------------------------------------------------ KFRA


def output_hessian(capture: Capture, *, chunk: int = 128) -> Array:
  """``𝒢̃_L = Σ_n (∇²_o L)_{nn}`` = ``(1/B) Σ_n H_n`` for outputs of shape ``(B, D)``.

  Column ``j`` is ``Σ_n H_L (e_j broadcast over examples)``; columns are computed in
  chunks of ``chunk`` to bound memory (``B × chunk × D``).
  """
  lin = capture.lin
  outputs = lin.outputs
  dim = outputs.shape[-1]

  def column(e):
    u = jnp.zeros_like(outputs) + e  # sharded like the outputs, unlike broadcast_to
    return jnp.sum(lin.output_hvp(u), axis=0)

  eye = jnp.eye(dim, dtype=outputs.dtype)
  cols = jax.lax.map(column, eye, batch_size=min(dim, chunk))
  return 0.5 * (cols + cols.T)


def activation_derivative(activation: Activation, h: Array) -> Array:
  """``f′(h)`` elementwise (``f = None`` is the identity)."""
  if activation is None:
    return jnp.ones_like(h)
  return jax.jvp(activation, (h,), (jnp.ones_like(h),))[1]


def check_chain(capture: Capture, activations: Sequence[Activation],
                solver: str = "curvax.kfra") -> None:
  """Trace-time checks that the model is a chain KFRA's recursion applies to.

  Every block a Dense layer called once, in order, on 2-D inputs, each layer's input
  size the previous one's output size, nothing outside the blocks, the network output
  the last layer's output, and one activation per gap between layers.
  """
  def fail(why):
    raise ValueError(
        f"{solver}: KFRA's recursion (kfra_kflr.md Algorithm 1) needs a chain of Dense "
        "layers with elementwise activations between them and the last layer's output as "
        f"the network output; {why}. Use curvax.kflr or curvax.kfac for other models.")

  calls = capture.calls
  described = {"conv": "a convolution", "embed": "an embedding",
               "norm": "a normalisation layer (LayerNorm / RMSNorm)"}
  for c in calls:
    if c.kind != "dense":
      fail(f"{c.name} is {described.get(c.kind, c.kind)}")
  if len(capture.blocks) != len(calls):
    fail("a layer is called more than once or could not be factored")
  loose = sorted(set(capture.fallback) | {i for b in capture.full_blocks for i in b.leaves})
  if loose:
    fail("parameters " + ", ".join(capture.leaf_names[i] for i in loose)
         + " belong to no Dense layer")
  for i, call in enumerate(calls):
    if len(call.input_shape) != 2:
      fail(f"layer {call.name} has input shape {call.input_shape}, not (batch, features)")
    if i > 0 and call.in_dim != calls[i - 1].out_dim:
      fail(f"layer {call.name} takes {call.in_dim} features but the layer before it "
           f"gives {calls[i - 1].out_dim}")
  if tuple(capture.lin.outputs.shape) != calls[-1].output_shape:
    fail(f"the network output shape {tuple(capture.lin.outputs.shape)} is not the last "
         f"layer's output shape {calls[-1].output_shape}")
  if len(activations) != len(calls) - 1:
    fail(f"activations has {len(activations)} entries for {len(calls)} layers (one per "
         "gap between consecutive layers is needed)")


def chain_mismatch(capture: Capture, activations: Sequence[Activation]) -> Array:
  """Largest relative gap between the captured chain and ``a_λ = f_λ(h_λ)``, ``o = h_L``.

  Zero (to rounding) exactly when the declared activations and the chain structure
  describe what ``predict_fn`` computed.
  """
  gaps = []
  for i, f in enumerate(activations):
    h, a = capture.outputs[i], capture.inputs[i + 1]
    expected = h if f is None else f(h)
    gaps.append(jnp.max(jnp.abs(a - expected)) / (1.0 + jnp.max(jnp.abs(a))))
  out = capture.lin.outputs
  gaps.append(jnp.max(jnp.abs(out - capture.outputs[-1])) / (1.0 + jnp.max(jnp.abs(out))))
  return jnp.max(jnp.stack([g.astype(jnp.float32) for g in gaps]))


def _raise_if_mismatched(mismatch, *, tolerance: float, solver: str):
  # Plain numpy only: a host callback must not dispatch JAX operations (it can deadlock
  # with the main thread).
  mismatch = float(np.asarray(mismatch))
  if mismatch > tolerance:
    raise ValueError(
        f"{solver}: the model is not the chain KFRA was told it is: a layer's input differs "
        f"from the declared activation of the previous layer's output (relative gap "
        f"{mismatch:.3g}), or the network output is not the last Dense layer's "
        "output (a skip connection, normalisation or pooling between layers?). Check "
        "activations= or use curvax.kflr / curvax.kfac.")


def verify_chain(capture: Capture, activations: Sequence[Activation], *,
                 tolerance: float = 1e-3, solver: str = "curvax.kfra") -> None:
  """Raises (at run time under jit, via ``jax.debug.callback``) if the chain is wrong."""
  mismatch = chain_mismatch(capture, activations)
  check = functools.partial(_raise_if_mismatched, tolerance=float(tolerance),
                            solver=solver)
  if isinstance(mismatch, jax.core.Tracer):
    jax.debug.callback(check, mismatch)
  else:
    check(mismatch)


def _gap_function(closed, source, target) -> Optional[Callable[[Array], Array]]:
  """The function the jaxpr applies to ``source`` to compute ``target``, if ``target``
  depends on ``source`` and on constants known at trace time only (else ``None``)."""
  import jax.extend.core as jex  # noqa: PLC0415 (only KFRA's trace-time check needs it)
  jaxpr = closed.jaxpr
  if target is source:
    return lambda h: h
  producer = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
  known = {v: c for v, c in zip(jaxpr.constvars, closed.consts)
           if not isinstance(c, jax.core.Tracer)}
  used_eqns, used_consts, stack, seen = set(), [], [target], set()
  reached_source = False
  while stack:
    v = stack.pop()
    if isinstance(v, jex.Literal) or v in seen:
      continue
    seen.add(v)
    if v is source:
      reached_source = True
    elif v in known:
      used_consts.append(v)
    elif v in producer and not jaxpr.eqns[producer[v]].effects:
      used_eqns.add(producer[v])
      stack.extend(jaxpr.eqns[producer[v]].invars)
    else:  # a parameter, the batch (traced), another layer's value, an effect
      return None
  if not reached_source:
    return None
  # jax.extend.core.DebugInfo is public from jax 0.10; older releases accept none.
  info = (jex.DebugInfo("curvax.kfra activation check", None, ("h",), ("a",))
          if hasattr(jex, "DebugInfo") else None)
  sub = jex.Jaxpr(used_consts, [source], [target],
                  [jaxpr.eqns[i] for i in sorted(used_eqns)], debug_info=info)
  fn = jex.jaxpr_as_fun(jex.ClosedJaxpr(sub, [known[v] for v in used_consts]))
  return lambda h: fn(h)[0]


def check_declared_activations(capture: Capture, activations: Sequence[Activation], *,
                               tolerance: float = 1e-3,
                               solver: str = "curvax.kfra") -> None:
  """Trace-time check that each declared activation is what the model applies.

  The model's jaxpr (:meth:`Capture.layer_jaxpr`) gives, per gap, the computation from
  a layer's output ``h_λ`` to the next layer's input ``a_λ``; where that depends on
  ``h_λ`` and trace-time constants only (an elementwise activation, a scaling), it is
  evaluated next to the declared ``f_λ`` on probe values of ``h_λ``'s shape, and a
  mismatch raises ``ValueError`` before anything runs. A gap that also reads other
  values (a skip connection reads the batch or another layer) is left to the run-time
  check (:func:`verify_chain`).
  """
  closed = capture.layer_jaxpr()
  num = len(capture.calls)
  outvars = closed.jaxpr.outvars
  layer_inputs, layer_outputs = outvars[-2 * num:-num], outvars[-num:]
  for i, f in enumerate(activations):
    applied = _gap_function(closed, layer_outputs[i], layer_inputs[i + 1])
    if applied is None:
      continue
    shape, dtype = capture.calls[i].output_shape, capture.outputs[i].dtype
    with jax.ensure_compile_time_eval():
      probe = jnp.linspace(-6.0, 6.0, math.prod(shape), dtype=jnp.float32)
      probe = probe.reshape(shape).astype(dtype)
      model = np.asarray(applied(probe), np.float64)
      declared = np.asarray(probe if f is None else f(probe), np.float64)
    gap = np.max(np.abs(model - declared)) / (1.0 + np.max(np.abs(model)))
    # The same function written differently rounds differently in low precision.
    if not gap <= max(tolerance, 8 * float(jnp.finfo(dtype).eps)):
      name = "linear (None)" if f is None else getattr(f, "__name__", repr(f))
      raise ValueError(
          f"{solver}: the declared activation {name} after layer {i} "
          f"({capture.calls[i].name}) is not what the model applies there: on probe "
          f"values in [-6, 6] they differ by {gap:.3g} (relative). Check activations= "
          "(one entry per gap between consecutive Dense layers, None for linear).")


def kfra(capture: Capture, activations: Union[Activation, Sequence[Activation]], *,
         check: bool = True, solver: str = "curvax.kfra") -> Estimate:
  """KFRA: Algorithm 1's backward recursion of the expected pre-activation GGN.

  ``𝒢̃_L = E[H_L]``, then for ``λ = L … 2``:
  ``𝒢̃_{λ−1} = (W_λᵀ 𝒢̃_λ W_λ) ⊙ ((1/B) Σ_n A′_n A′_nᵀ)`` with ``A′ = f′(h_{λ−1})``
  (eq. 26; ``W_λᵀ 𝒢 W_λ = K 𝒢 Kᵀ`` for a Flax kernel ``K = W_λᵀ`` of shape
  ``(in, out)``). The bias row of ``Q̃`` does not enter the recursion.

  Args:
    capture: a :class:`Capture` of a chain of Dense layers.
    activations: the elementwise function between consecutive layers — one callable
      for every gap, or a sequence with one entry per gap (``None``: linear). See
      :func:`chain_activations` for curvax's MLP and autoencoder.
    check: verify at run time that the declared chain is what the model computed.
  """
  num = len(capture.calls)
  if activations is None or callable(activations):
    activations = [activations] * (num - 1)
  activations = list(activations)
  check_chain(capture, activations, solver)
  if check:
    check_declared_activations(capture, activations, solver=solver)
    verify_chain(capture, activations, solver=solver)
  batch = capture.batch_size
  g = [None] * num
  mean = capture.lin.batch_mean
  g[-1] = mean(output_hessian(capture))
  for lam in range(num - 1, 0, -1):
    kernel = capture.leaves[capture.blocks[lam].kernel]
    h_prev = capture.outputs[lam - 1]
    d = activation_derivative(activations[lam - 1], h_prev)
    propagated = kernel @ g[lam] @ kernel.T
    g[lam - 1] = propagated * mean(row_gram(d) / batch)
  return Estimate(input_factors(capture), tuple(g), None)


def chain_activations(model) -> list[Activation]:
  """The activations between the layers of :class:`curvax.problems.models.MLP` or
  :class:`~curvax.problems.models.Autoencoder`, for :func:`curvax.kfra`."""
  from curvax.problems import models  # Local: problems is not a runtime dependency.
  if isinstance(model, models.MLP):
    return [model.activation] * (len(model.features) - 1)
  if isinstance(model, models.Autoencoder):
    encoder = len(model.hidden) - 1
    return [model.activation] * encoder + [None] + [model.activation] * encoder
  raise TypeError(f"chain_activations: unknown model type {type(model).__name__}; pass "
                  "activations= to curvax.kfra as a list, one per gap between layers.")
