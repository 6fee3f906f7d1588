"""Cost of each curvature-vector product relative to one jitted gradient of optax's loss.

    python -m benchmarks.cvp_cost

Model: the MLP 784-1000-500-250-10 (tanh), batch 256, softmax cross-entropy. The baseline
is the gradient a user writes: ``jax.grad`` of
``optax.softmax_cross_entropy_with_integer_labels(...).mean()``
(``curvax.problems.training.optax_objective``). Prints one
JSON line per product, ``ratio = time(product) / time(grad)``, medians of interleaved
jitted calls. "cached" products run on a linearisation computed beforehand (its residuals
are passed into the jitted product as arguments); the others include their forward pass.

FLOP floors on this net (the first layer needs no input tangent/cotangent): cached J v
≈ 0.59, cached GGN·v ≈ 1.18, fused Jᵀ(H_L J z + ∇L) with its forward ≈ 1.6.
``cg_iteration/cached`` is one bare CG iteration on the damped GGN of a cached
linearisation; ``hf/cg_iteration`` is one iteration of the CG that ``hessian_free``
actually runs (the same product, plus Martens' progress history and the ``num_saved``
iterates kept for CG backtracking; target ≤ 1.3). Both are marginal costs: the time of
``2·CG_ITERS`` iterations minus that of ``CG_ITERS``, per iteration.
"""

from __future__ import annotations

import argparse

import jax
import optax

import curvax
from curvax.hessian_free import DEFAULT_NUM_SAVED
from benchmarks.timing import median_times, report_ratios
from curvax.problems import training
from curvax.problems.models import MLP

CG_ITERS = 10


def products(batch_size: int = 256, seed: int = 0):
  """Zero-argument jitted callables for every product, keyed by benchmark name."""
  key_x, key_y, key_p, key_v = jax.random.split(jax.random.PRNGKey(seed), 4)
  model = MLP(features=(1000, 500, 250, 10))
  x = jax.random.uniform(key_x, (batch_size, 784))
  y = jax.random.randint(key_y, (batch_size,), 0, 10)
  params = model.init(key_p, x)
  loss = curvax.losses.softmax_cross_entropy()
  predict = lambda p: model.apply(p, x)
  v = jax.tree.map(lambda a: jax.random.normal(key_v, a.shape, a.dtype), params)
  u = jax.random.normal(key_v, (batch_size, 10))

  objective = training.optax_objective(loss)
  grad = jax.jit(jax.grad(lambda p: objective(predict(p), y)))
  lin = jax.jit(lambda p: curvax.linearize(predict, p, loss=loss, targets=y))(params)
  cached = lambda method: jax.jit(lambda lin, arg: getattr(lin, method)(arg))
  jv, jtu, ggn_cached, fisher_cached, fused_cached = (
      cached(m) for m in ("jvp", "vjp", "ggn_vp", "fisher_vp", "fused_ggn_vp"))

  def fresh(method):
    return jax.jit(lambda p, arg: getattr(
        curvax.linearize(predict, p, loss=loss, targets=y), method)(arg))

  ggn, fused, hessian, fisher = (fresh(m) for m in
                                 ("ggn_vp", "fused_ggn_vp", "hessian_vp", "fisher_vp"))

  def cg_solve(iterations, num_saved=1):
    """CG on the damped GGN of a cached linearisation, exactly ``iterations`` long.

    With ``num_saved > 1`` the saved iterates are returned too (backtracking reads them),
    so the compiler cannot drop their bookkeeping.
    """
    def solve(lin, b):
      result = curvax.cg.conjugate_gradient(
          lambda x: optax.tree.add_scale(lin.ggn_vp(x), 1e-3, x), b,
          optax.tree.zeros_like(b), max_iters=iterations, min_iters=iterations, tol=0.0,
          num_saved=num_saved)
      return result.x if num_saved == 1 else (result.x, result.saved)
    return jax.jit(solve)

  cg_short, cg_long = cg_solve(CG_ITERS), cg_solve(2 * CG_ITERS)
  # hessian_free's solve: its default num_saved iterates kept for CG backtracking.
  hf_saved = DEFAULT_NUM_SAVED
  hf_short, hf_long = cg_solve(CG_ITERS, hf_saved), cg_solve(2 * CG_ITERS, hf_saved)
  return {
      "grad": lambda: grad(params),
      "jvp/cached": lambda: jv(lin, v),
      "vjp/cached": lambda: jtu(lin, u),
      "ggn_vp/cached": lambda: ggn_cached(lin, v),
      "fisher_vp/cached": lambda: fisher_cached(lin, v),
      "fused_ggn_vp/cached": lambda: fused_cached(lin, v),
      "ggn_vp": lambda: ggn(params, v),
      "fused_ggn_vp": lambda: fused(params, v),
      "fisher_vp": lambda: fisher(params, v),
      "hessian_vp": lambda: hessian(params, v),
      "cg/short": lambda: cg_short(lin, v),
      "cg/long": lambda: cg_long(lin, v),
      "hf/short": lambda: hf_short(lin, v),
      "hf/long": lambda: hf_long(lin, v),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=256)
  args = parser.parse_args()
  times = median_times(products(args.batch_size), repeats=args.repeats)
  # One CG iteration = the marginal cost of CG_ITERS more iterations, per iteration.
  for prefix, name in (("cg", "cg_iteration/cached"), ("hf", "hf/cg_iteration")):
    times[name] = (times.pop(f"{prefix}/long") - times.pop(f"{prefix}/short")) / CG_ITERS
  report_ratios(times, "grad", model="mlp784-1000-500-250-10", batch=args.batch_size,
                backend=jax.default_backend())


if __name__ == "__main__":
  main()
