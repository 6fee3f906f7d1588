"""curvax: second-order optimisers for JAX as optax transforms, on one CVP module."""

import importlib.metadata as _metadata

from curvax import averaging
from curvax import cg
from curvax import cvp
from curvax import damping
from curvax import kron
from curvax import losses
from curvax import pairs
from curvax import quadratic
from curvax.averaging import PolyakState, averaged_params, polyak
from curvax.curveball import CurveBallState, curveball
from curvax.cvp import Linearization, linearize, sharpness, top_eigenvalue
from curvax.extra_args import objective, without_weak_types
from curvax.hessian_free import HessianFreeState, hessian_free
from curvax.kfac import KRON_PAPER_SETTINGS, KFACState, ekfac, kfac, kflr, kfra
from curvax.quasi_newton import QuasiNewtonState, lsr1, sqn
from curvax.soap import SOAPState, soap

__all__ = [
    "__version__",
    "averaging", "cg", "cvp", "damping", "kron", "losses", "pairs", "quadratic",
    "Linearization", "linearize", "sharpness", "top_eigenvalue", "objective",
    "without_weak_types",
    "CurveBallState", "curveball",
    "HessianFreeState", "hessian_free",
    "KFACState", "KRON_PAPER_SETTINGS", "kfac", "kflr", "kfra", "ekfac",
    "PolyakState", "polyak", "averaged_params",
    "QuasiNewtonState", "sqn", "lsr1",
    "SOAPState", "soap",
]

# The version lives in pyproject.toml alone; the installed metadata carries it here.
try:
  __version__ = _metadata.version("curvax")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
  __version__ = "0+unknown"
