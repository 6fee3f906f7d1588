"""Test problems from the papers: analytic functions, Flax models, offline datasets and
the standard library's source as text."""

from curvax.problems import datasets, functions, models, text

__all__ = ["datasets", "functions", "models", "text"]
