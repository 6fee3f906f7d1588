"""The non-exponential-family model of kfra_kflr.md §5.2: a mixture of two binary
classifiers, where the Gauss-Newton matrix and the Fisher differ.

With network outputs ``h = (h₁, h₂, h₃)`` and ``σ`` the logistic function (eq. 27):

    p(y | h) = σ(h₁) σ(h₂)^y σ(−h₂)^{1−y} + (1 − σ(h₁)) σ(h₃)^y σ(−h₃)^{1−y}

and the loss is the negative log-likelihood ``−log p(y | h)``. Its output Hessian
``H_L = ∇²_h(−log p(y|h))`` depends on the observed ``y`` and can be indefinite, so
``E_{p(y|x)}[H_L]`` (the GGN, over the data) differs from ``E_{p_θ(y|x)}[H_L]`` (the Fisher,
over the model): App. D.2. KFLR and KFRA use the GGN with ``H_L``'s PSD part (its
eigendecomposition with negative eigenvalues set to zero, from autodiff); KFAC samples
``y`` from the model and so estimates the Fisher.

The paper's task: classify MNIST digits as even or odd (:func:`even_odd`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from curvax import losses

Array = jax.Array


def log_likelihood(h: Array, y: Array) -> Array:
  """``log p(y | h)`` of eq. 27 for one example (``h`` of shape ``(3,)``, ``y ∈ [0, 1]``)."""
  log_sig = jax.nn.log_sigmoid
  first = log_sig(h[0]) + y * log_sig(h[1]) + (1 - y) * log_sig(-h[1])
  second = log_sig(-h[0]) + y * log_sig(h[2]) + (1 - y) * log_sig(-h[2])
  return jnp.logaddexp(first, second)


def probability_of_one(h: Array) -> Array:
  """``p(y = 1 | h) = σ(h₁)σ(h₂) + σ(−h₁)σ(h₃)``."""
  sig = jax.nn.sigmoid
  return sig(h[0]) * sig(h[1]) + sig(-h[0]) * sig(h[2])


def _check_targets(outputs, targets):
  if outputs.ndim != 2 or outputs.shape[1] != 3:
    raise ValueError(f"mixture_of_binary_classifiers: outputs must be (batch, 3), got "
                     f"shape {outputs.shape}.")
  if targets.shape != outputs.shape[:1] or not jnp.issubdtype(targets.dtype, jnp.floating):
    raise ValueError(f"mixture_of_binary_classifiers: targets must be floating 0/1 labels "
                     f"of shape {outputs.shape[:1]}, got {targets.dtype}{targets.shape}.")


def mixture_of_binary_classifiers() -> losses.Loss:
  """The negative log-likelihood of eq. 27 as a :class:`curvax.losses.Loss`.

  Built with :func:`curvax.losses.from_fn` (autodiff ``hessian_sqrt``, the PSD part of
  ``H_L``), with ``hessian_vp`` replaced by the product with that same PSD part, so that
  every curvax solver sees one consistent, positive semi-definite GGN
  ``Jᵀ (H_L)₊ J``. ``sample`` draws ``y ~ Bernoulli(p(y=1|h))`` — KFAC's Fisher.
  """

  def nll(h, y):
    return -log_likelihood(h, y)

  def sample(key, h, y):
    return jax.random.bernoulli(key, probability_of_one(h)).astype(y.dtype)

  loss = losses.from_fn(nll, name="mixture_of_binary_classifiers", sample_fn=sample,
                        check_targets=_check_targets)
  sqrt = loss.per_example_sqrt

  def psd_hvp(h, y, u):
    columns = sqrt(h, y)  # (K, 3): (H_L)₊ = Σ_k c_k c_kᵀ
    return columns.T @ (columns @ u)

  return dataclasses.replace(loss, per_example_hvp=psd_hvp)


def even_odd(labels: Array) -> Array:
  """Digit labels as the float targets of the even/odd task (1 = even)."""
  return (labels % 2 == 0).astype(jnp.float32)
