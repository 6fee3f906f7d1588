"""Benchmarks: cost ratios measured side by side in one process, and paper reproductions.

Every ``python -m benchmarks.<name>`` runs with ``OPENBLAS_NUM_THREADS=1`` unless it is
set: jaxlib's CPU Cholesky / triangular solves (the Kronecker solvers' inverses) call
scipy's OpenBLAS, whose threads otherwise fight XLA's own pool — on 2 cores a KFAC step
measured 2–4× slower (the docs' advice for CPU users, docs/api/kfac.md). Set here, before anything
loads LAPACK.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
