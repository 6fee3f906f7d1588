"""curvax: second-order optimisers for JAX as optax transforms, on one CVP module."""

from curvax import cvp
from curvax import losses
from curvax import quadratic
from curvax.curveball import CurveBallState, curveball
from curvax.cvp import Linearization, linearize, sharpness, top_eigenvalue
from curvax.extra_args import objective

__all__ = [
    "cvp", "losses", "quadratic",
    "Linearization", "linearize", "sharpness", "top_eigenvalue", "objective",
    "CurveBallState", "curveball",
]

__version__ = "0.1.0"
