"""Test problems from the papers: analytic functions, Flax models and offline datasets."""

from curvax.problems import datasets, functions, models

__all__ = ["datasets", "functions", "models"]
