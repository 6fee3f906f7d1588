"""The extra arguments every curvax solver takes in ``update``, and the matching objective.

A solver's ``update(updates, state, params, **extra_args)`` needs the model on the
current batch. It is given either as

* ``predict_fn`` (``params -> outputs``) and ``targets``, or
* ``linearization``: a :class:`curvax.cvp.Linearization` the caller already built with
  :func:`curvax.linearize` — e.g. with ``has_aux=True`` to read a Flax BatchNorm's
  updated ``batch_stats`` from ``linearization.aux`` without a second forward pass.

``optax.chain`` hands every extra argument to every transform, and optax's line searches
pass the ones they do not use to their ``value_fn``, which must name them.
:func:`objective` builds that ``value_fn``, so
``optax.chain(curvax.<solver>(loss), optax.scale_by_backtracking_linesearch(...))``
works with ``value_fn=curvax.objective(loss)``; pass the chain's initial state through
:func:`without_weak_types` so that a jitted step compiles once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from curvax import cvp
from curvax import losses as losses_lib


def check_linearization(solver: str, linearization: cvp.Linearization,
                        predict_fn: Optional[Callable], axis_name: Optional[str]) -> None:
  """A passed-in linearisation excludes ``predict_fn`` and must share the solver's axis."""
  if predict_fn is not None:
    raise ValueError(f"{solver}: pass either linearization= or predict_fn=/targets=, "
                     "not both.")
  if linearization.axis_name != axis_name:
    raise ValueError(
        f"{solver}: the linearization was built with axis_name="
        f"{linearization.axis_name!r} but the solver has axis_name={axis_name!r}.")


def linearization_from(solver: str, loss: losses_lib.Loss, params, *,
                       predict_fn: Optional[Callable] = None, targets=None,
                       linearization: Optional[cvp.Linearization] = None,
                       axis_name: Optional[str] = None) -> cvp.Linearization:
  """The step's linearisation, built from ``predict_fn``/``targets`` or passed in.

  ``axis_name`` is the solver's data-parallel axis (see :func:`curvax.linearize`); a
  passed-in linearisation must have been built with the same one.
  """
  if params is None:
    raise ValueError(f"{solver}: params are required: call "
                     "tx.update(updates, state, params, predict_fn=..., targets=...).")
  if linearization is not None:
    check_linearization(solver, linearization, predict_fn, axis_name)
    return linearization
  predict_fn, targets = model_from(solver, predict_fn=predict_fn, targets=targets)
  return cvp.linearize(predict_fn, params, loss=loss, targets=targets,
                       axis_name=axis_name)


def model_from(solver: str, *, predict_fn: Optional[Callable] = None, targets=None,
               linearization: Optional[cvp.Linearization] = None,
               axis_name: Optional[str] = None) -> tuple[Callable, Any]:
  """``(predict_fn, targets)`` from the extra arguments, or from a passed-in
  linearisation (for solvers that run the network themselves, e.g. the Kronecker
  family's layer capture)."""
  if linearization is not None:
    check_linearization(solver, linearization, predict_fn, axis_name)
    return linearization.predict, linearization.targets
  if predict_fn is None or targets is None:
    missing = [n for n, v in (("predict_fn", predict_fn), ("targets", targets))
               if v is None]
    raise ValueError(
        f"{solver}: missing extra argument(s) {missing}: call tx.update(updates, state, "
        "params, predict_fn=lambda p: model.apply(p, x), targets=y) or pass "
        "linearization=curvax.linearize(...).")
  if not callable(predict_fn):
    raise TypeError(f"{solver}: predict_fn must be callable params -> outputs, got "
                    f"{type(predict_fn).__name__}.")
  return predict_fn, targets


def given_gradient(solver: str, updates, params):
  """The caller's gradient, or ``None`` when the solver should compute its own.

  ``None`` and empty pytrees both mean "compute it": ``flax.nnx.Optimizer.update(model,
  None, ...)`` turns ``None`` into an empty ``nnx.State``. A gradient whose tree
  structure or leaf shapes differ from ``params`` is refused with a ``ValueError`` that
  names ``solver`` (jax's own error would come from deep inside the solver, and a
  flattening solver could silently pair the wrong leaves).

  Args:
    solver: the solver's name, for the error message.
    updates: the ``updates`` argument of the solver's ``update``.
    params: the parameters the gradient must match.
  """
  if updates is None or not jax.tree.leaves(updates):
    return None
  check_matches_params(solver, updates, params)
  return updates


def check_curvature_batch(solver: str, predict_fn, targets) -> None:
  """Refuses ``curvature_batch=True`` without its two extra arguments (a ``ValueError``
  naming ``solver``, raised at trace time)."""
  if predict_fn is None or targets is None:
    raise ValueError(f"{solver}(curvature_batch=True): missing extra arguments "
                     "curvature_predict_fn / curvature_targets (the curvature batch).")


def check_matches_params(solver: str, updates, params) -> None:
  """Raise a ``ValueError`` unless ``updates`` has the structure and shapes of ``params``."""
  updates_def, params_def = jax.tree.structure(updates), jax.tree.structure(params)
  if updates_def != params_def:
    raise ValueError(
        f"{solver}: the gradient (updates) does not have the structure of params: "
        f"updates is {_brief(updates_def)}, params is {_brief(params_def)}. Pass a "
        "gradient of the same pytree as params (e.g. jax.grad of the loss with respect "
        "to params), or None to let the solver compute it.")
  for (path, p), g in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(updates)):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"{solver}: the gradient (updates) has shape {jnp.shape(g)} at "
          f"{jax.tree_util.keystr(path)} where params has shape {jnp.shape(p)}. Pass a "
          "gradient of the same pytree as params, or None to let the solver compute it.")


def _brief(treedef, limit: int = 160) -> str:
  text = str(treedef)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def objective(loss: "losses_lib.Loss | str", *,
              axis_name: Optional[str] = None) -> Callable[..., jax.Array]:
  """``value_fn(params, predict_fn=None, targets=None, linearization=None, ...)``.

  Recipe (a line search after any curvax solver)::

    tx = optax.chain(curvax.hessian_free(loss),
                     optax.scale_by_backtracking_linesearch(max_backtracking_steps=15))
    state = curvax.without_weak_types(tx.init(params))  # else step 2 recompiles
    value_fn = curvax.objective(loss)
    value, grad = jax.value_and_grad(value_fn)(params, predict_fn=f, targets=y)
    updates, state = tx.update(grad, state, params, value=value, grad=grad,
                               value_fn=value_fn, predict_fn=f, targets=y)

  The ``value_fn`` optax's line searches need. Evaluates ``loss(predict_fn(params),
  targets)``; with ``linearization`` it uses the network and targets stored in it
  (auxiliary outputs dropped). With ``axis_name`` the value is averaged over that
  data-parallel axis. The curvature sub-batch arguments of Hessian-free and the
  quasi-Newton solvers are accepted and ignored.
  """
  loss = losses_lib.get(loss)

  def value_fn(params, predict_fn=None, targets=None, linearization=None,
               curvature_predict_fn=None, curvature_targets=None):
    del curvature_predict_fn, curvature_targets
    if linearization is not None:
      return linearization.loss_at(params)
    value = loss.value(predict_fn(params), targets)
    return value if axis_name is None else jax.lax.pmean(value, axis_name)

  return value_fn


def without_weak_types(tree):
  """``tree`` with every leaf a strongly typed JAX array of the same dtype.

  ``optax.scale_by_backtracking_linesearch`` initialises its step counter as a weakly
  typed integer and returns it strongly typed, so a jitted step fed its own output
  state sees a new input type at step 2 and compiles again (seconds for a curvax
  solver). Apply this to the initial state: ``state = without_weak_types(tx.init(params))``.
  """
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), tree)
