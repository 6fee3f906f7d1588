"""curvax: second-order optimisers for JAX as optax transforms, on one CVP module."""

from curvax import cg
from curvax import cvp
from curvax import losses
from curvax import pairs
from curvax import quadratic
from curvax.curveball import CurveBallState, curveball
from curvax.cvp import Linearization, linearize, sharpness, top_eigenvalue
from curvax.extra_args import objective
from curvax.hessian_free import HessianFreeState, hessian_free
from curvax.quasi_newton import QuasiNewtonState, lsr1, sqn

__all__ = [
    "cg", "cvp", "losses", "pairs", "quadratic",
    "Linearization", "linearize", "sharpness", "top_eigenvalue", "objective",
    "CurveBallState", "curveball",
    "HessianFreeState", "hessian_free",
    "QuasiNewtonState", "sqn", "lsr1",
]

__version__ = "0.1.0"
