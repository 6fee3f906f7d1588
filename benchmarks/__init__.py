"""Benchmarks: cost ratios measured side by side in one process, and paper reproductions."""
