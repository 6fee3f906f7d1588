"""Sphinx configuration for curvax's documentation (``make docs``).

Built offline: no intersphinx (its inventories would be fetched from the internet), so
references to other libraries' types are listed in ``nitpick_ignore_regex`` below —
external names only; every ``curvax`` reference must resolve.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import curvax  # noqa: E402

project = "curvax"
author = "curvax authors"
copyright = "curvax authors"  # noqa: A001
release = curvax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

# Notebooks render from their stored outputs (they are executed by tests/test_notebooks.py).
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False
autodoc_default_options = {"show-inheritance": False}

html_theme = "furo"
html_title = f"curvax {release}"
html_static_path = []

nitpicky = True
# Third-party and standard-library types only (no intersphinx offline). Never curvax.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|flax|chex|numpy|np|jnp|orbax|typing|typing_extensions|collections|dataclasses|functools|pathlib|enum|abc|types|os|io|re)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Optional|Union|Sequence|Mapping|Iterable|Iterator|Hashable|NamedTuple|Literal|TypeVar|Protocol|Generator)"),
    (r"py:.*", r"(int|float|bool|str|bytes|tuple|list|dict|set|frozenset|object|type|None|NoneType|callable|Ellipsis|complex|slice|range|Exception|ValueError|TypeError|RuntimeError|KeyError|NotImplementedError)"),
    # curvax._validation's private alias of optax's union "a number, an array or an
    # optax schedule", as the annotations show it
    (r"py:class", r"ScalarOrSchedule"),
]

exclude_patterns += ["evidence"]  # included into the solver pages, not pages themselves


# -- Re-exported names --------------------------------------------------------------
# curvax documents each public object once, under the name users import it by
# (``curvax.kfac``, ``curvax.Linearization``), while docstrings inside the modules call
# them by their local names (:func:`kfac` inside ``curvax.kron.stages``). This resolves
# a reference Sphinx could not find by importing what the name means in the module the
# reference sits in and linking the page that documents that very Python object. A
# reference to something that does not exist (a renamed function) still fails the build.

import importlib  # noqa: E402

_SCALARS = (int, float, complex, str, bytes, bool, type(None))


def _lookup(path):
  """The object ``path`` names: attributes first (``curvax.kron.capture`` is the
  function), a submodule where the path continues past an attribute that has none."""
  parts = path.split(".")
  try:
    obj = importlib.import_module(parts[0])
  except ImportError:
    return None
  for i, part in enumerate(parts[1:], start=1):
    prefix = ".".join(parts[:i + 1])
    last = i == len(parts) - 1
    if hasattr(obj, part) and (last or hasattr(getattr(obj, part), parts[i + 1])):
      obj = getattr(obj, part)
      continue
    try:
      obj = importlib.import_module(prefix)
    except ImportError:
      return None
  return obj


_documented_cache = {}


def _documented(env):
  domain = env.get_domain("py")
  key = (id(env), len(domain.objects))
  if key not in _documented_cache:
    by_id = {}
    for name, entry in domain.objects.items():
      if entry.aliased or not name.startswith("curvax"):
        continue
      obj = _lookup(name)
      if obj is None or isinstance(obj, _SCALARS):
        continue
      # a module and the function it exports may share a name: keep both kinds apart
      by_id.setdefault((id(obj), entry.objtype == "module"), (name, entry))
    _documented_cache.clear()
    _documented_cache[key] = by_id
  return _documented_cache[key]


def _resolve_reexport(app, env, node, contnode):
  from sphinx.util.nodes import make_refnode
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"].lstrip(".~")
  module, cls = node.get("py:module"), node.get("py:class")
  candidates = []
  if module:
    if cls:
      candidates.append(f"{module}.{cls}.{target}")
    parts = module.split(".")
    candidates += [".".join(parts[:i]) + "." + target for i in range(len(parts), 0, -1)]
  candidates.append(target)
  want_module = node.get("reftype") == "mod"
  by_id = _documented(env)
  for candidate in candidates:
    if not candidate.startswith("curvax"):
      continue
    obj = _lookup(candidate)
    if obj is None or isinstance(obj, _SCALARS):
      continue
    found = by_id.get((id(obj), want_module))
    if found:
      name, entry = found
      return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id,
                          contnode, name)
  return None


def _skip_member(app, what, name, obj, skip, options):
  """NamedTuple fields are documented by their class's ``Attributes:`` section, not
  twice; a default that is another library's function (a Flax field's
  ``activation = nn.sigmoid``) does not bring that library's docstring along."""
  doc = getattr(obj, "__doc__", None) or ""
  if what == "class" and doc.startswith("Alias for field number"):
    return True
  if what == "class" and callable(obj) and not isinstance(obj, type) and not (
      getattr(obj, "__module__", "") or "").startswith("curvax"):
    return True
  return None


def setup(app):
  app.connect("missing-reference", _resolve_reexport)
  app.connect("autodoc-skip-member", _skip_member)
