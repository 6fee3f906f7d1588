"""curvax: second-order optimisers for JAX as optax transforms, on one CVP module."""

from curvax import cvp
from curvax import losses
from curvax.cvp import Linearization, linearize, sharpness, top_eigenvalue

__all__ = ["cvp", "losses", "Linearization", "linearize", "sharpness", "top_eigenvalue"]

__version__ = "0.1.0"
