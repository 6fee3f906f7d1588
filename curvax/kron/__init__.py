"""Kronecker-factored curvature: layer capture, factor estimators, damped inverses.

The building blocks of :func:`curvax.kfac`, :func:`curvax.kflr` and :func:`curvax.kfra`
(kfra_kflr.md §3, App. C):

* :func:`capture` runs ``predict_fn`` once, finds its Flax ``nn.Dense`` /
  ``nn.DenseGeneral`` / ``nn.Conv`` / ``nn.Embed`` / ``nn.LayerNorm`` / ``nn.RMSNorm``
  layers (or :func:`dense` tags in pure JAX / nnx code), and linearises the network in
  the parameters and a zero perturbation of every layer output
  (:mod:`curvax.kron.capture`);
* :func:`kfac_factors`, :func:`kflr_factors`, :func:`kfra_factors` estimate each
  layer's ``Q̃`` and ``𝒢̃`` (:mod:`curvax.kron.factors`), and the full blocks of
  normalisation layers' scales and offsets and of vector parameters no layer uses
  (:mod:`curvax.kron.full_blocks`); what has neither gets a diagonal fallback, named in
  a warning;
* :mod:`curvax.kron.state` keeps their moving averages and damped inverses and
  applies the factored-damping preconditioner (:mod:`curvax.kron.inverse`);
* :mod:`curvax.kron.eigen` keeps the factors as eigenbases instead (``inverse="eigh"``
  / ``"eigh_exact"``): one ``eigh`` per factor serves every damping, with factored or
  exact Tikhonov damping; :mod:`curvax.kron.ekfac` re-estimates the diagonal in those
  eigenbases from per-example gradients (:func:`curvax.ekfac`);
* :mod:`curvax.kron.stages` is one step of those solvers as named stages (estimate →
  represent → precondition → α/μ model and γ rule → τ rule → guard), with the factors'
  representation one pluggable piece.
"""

from curvax.kron import capture as capture_lib
from curvax.kron import eigen
from curvax.kron import ekfac
from curvax.kron import factors
from curvax.kron import full_blocks
from curvax.kron import inverse
from curvax.kron import state
from curvax.kron import stages
from curvax.kron.capture import Block, Capture, LayerCall, capture, conv_patches, dense
from curvax.kron.factors import Estimate, chain_activations
from curvax.kron.full_blocks import FullBlock
from curvax.kron.factors import kfac as kfac_factors
from curvax.kron.factors import kflr as kflr_factors
from curvax.kron.factors import kfra as kfra_factors
from curvax.kron.inverse import damped_inverses, damped_kron_inverse, factored_inverse

__all__ = [
    "capture_lib", "eigen", "ekfac", "factors", "full_blocks", "inverse", "state", "stages", "FullBlock",
    "Block", "Capture", "LayerCall", "capture", "conv_patches", "dense",
    "Estimate", "chain_activations", "kfac_factors", "kflr_factors", "kfra_factors",
    "damped_inverses", "damped_kron_inverse", "factored_inverse",
]
