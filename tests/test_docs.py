"""The documentation site (``make docs``): it builds with warnings as errors and
nitpicky references, every public name has an API entry, and headless Chromium renders
the built pages (a screenshot that shows a page, not an error or a blank window).

One module-scoped build into a temporary directory serves every test here.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

import curvax

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SOLVER_PAGE = "api/kfac.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("docs") / "html"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONHASHSEED="0")
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q",
       "-d", str(out.parent / "doctrees"), str(DOCS), str(out)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, (
      f"sphinx-build -W -n failed ({result.returncode}):\n{result.stderr[-8000:]}")
  return out


def _inventory(site: pathlib.Path) -> dict[str, str]:
  """``objects.inv`` as ``{name: role}`` (Sphinx's version-2 format: four header
  lines, then zlib-compressed ``name domain:role priority uri dispname`` lines)."""
  raw = (site / "objects.inv").read_bytes()
  header_end = 0
  for _ in range(4):
    header_end = raw.index(b"\n", header_end) + 1
  assert raw.startswith(b"# Sphinx inventory version 2")
  entries = {}
  for line in zlib.decompress(raw[header_end:]).decode().splitlines():
    name, role = line.split(" ", 2)[:2]
    entries.setdefault(name, role)
  return entries


def test_every_public_name_has_an_api_entry(site):
  inventory = _inventory(site)
  missing = [name for name in curvax.__all__ if name != "__version__"
             and f"curvax.{name}" not in inventory]
  assert not missing, f"curvax names without an API entry: {missing}"
  for module in ("curvax.losses", "curvax.cvp", "curvax.kron", "curvax.problems",
                 "curvax.kron.stages", "curvax.kron.eigen", "curvax.kron.ekfac",
                 "curvax.kron.factors", "curvax.kron.capture", "curvax.kron.state",
                 "curvax.kron.inverse", "curvax.kron.full_blocks"):
    assert inventory.get(module) == "py:module", module
  # the solver factories are documented as functions, at the name users import
  for solver in ("curveball", "hessian_free", "sqn", "lsr1", "kfac", "kflr", "kfra",
                 "ekfac", "soap", "polyak"):
    assert inventory[f"curvax.{solver}"] == "py:function", solver


def test_solver_pages_have_their_evidence(site):
  for page in ("curveball", "hessian_free", "sqn", "lsr1", "kfac", "ekfac", "soap",
               "polyak"):
    html = (site / "api" / f"{page}.html").read_text()
    assert "Defaults and evidence" in html, page
    assert "benchmarks/results/" in html, page


def test_notebooks_are_rendered_from_stored_outputs(site):
  for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
    html = site / "notebooks" / f"{notebook.stem}.html"
    assert html.exists(), f"{notebook.name} is not in the site"
    # its code cells are on the page (nb_execution_mode = "off": nothing is executed;
    # outputs show where the notebook stores them)
    html = html.read_text()
    assert "cell_input" in html, f"{notebook.name}: no code cells rendered"


def _png_pixels(path: pathlib.Path) -> tuple[int, int, list[bytes]]:
  """Width, height and RGB(A) rows of an 8-bit non-interlaced PNG (the stdlib alone)."""
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
  pos, idat, width = 8, b"", None
  while pos < len(data):
    length, kind = struct.unpack(">I4s", data[pos:pos + 8])
    chunk = data[pos + 8:pos + 8 + length]
    if kind == b"IHDR":
      width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
      assert depth == 8 and interlace == 0 and colour in (2, 6), (depth, colour)
      channels = 3 if colour == 2 else 4
    elif kind == b"IDAT":
      idat += chunk
    pos += 12 + length
  raw = zlib.decompress(idat)
  stride = width * channels
  rows, previous = [], bytearray(stride)
  for y in range(height):
    filter_type = raw[y * (stride + 1)]
    line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
    for i in range(stride):
      left = line[i - channels] if i >= channels else 0
      up = previous[i]
      upper_left = previous[i - channels] if i >= channels else 0
      if filter_type == 1:
        line[i] = (line[i] + left) & 255
      elif filter_type == 2:
        line[i] = (line[i] + up) & 255
      elif filter_type == 3:
        line[i] = (line[i] + (left + up) // 2) & 255
      elif filter_type == 4:
        p = left + up - upper_left
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
        predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
        line[i] = (line[i] + predictor) & 255
    rows.append(bytes(line[j] for k in range(0, stride, channels)
                      for j in range(k, k + 3)))
    previous = line
  return width, height, rows


def _chromium() -> str:
  found = shutil.which("chromium") or shutil.which("chromium-browser")
  if found is None:
    pytest.fail("headless Chromium is not installed: run `make chromium` (Debian's "
                "package: apt-get install chromium); `make test` and `make docs` do")
  return found


@pytest.mark.parametrize("page", ["index.html", SOLVER_PAGE])
def test_chromium_renders_the_page(site, page, tmp_path):
  png = tmp_path / "screenshot.png"
  result = subprocess.run(
      [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
       "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
       f"--screenshot={png}", "--window-size=1200,900", (site / page).as_uri()],
      capture_output=True, text=True, timeout=180)
  assert png.exists(), f"no screenshot of {page}:\n{result.stderr[-4000:]}"
  width, height, rows = _png_pixels(png)
  assert (width, height) == (1200, 900)
  pixels = [row[i:i + 3] for row in rows[::3] for i in range(0, len(row), 9)]
  counts: dict[bytes, int] = {}
  for pixel in pixels:
    counts[pixel] = counts.get(pixel, 0) + 1
  background, background_count = max(counts.items(), key=lambda item: item[1])
  # A rendered page: text in several colours (body, links, code, sidebar), a good part
  # of the window not background. A blank window or Chromium's error page fails this.
  assert len(counts) >= 20, f"{page}: only {len(counts)} colours in the screenshot"
  inked = 1 - background_count / len(pixels)
  assert inked > 0.03, f"{page}: {inked:.1%} of the screenshot differs from background"
  assert sum(background) > 600, f"{page}: the background {background} is not furo's light page"
  # and what Chromium rendered is the page itself, with its content
  dom = subprocess.run(
      [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
       "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
       "--dump-dom", (site / page).as_uri()],
      capture_output=True, text=True, timeout=180).stdout
  expected = "Guides" if page == "index.html" else "curvax.kflr"
  assert expected in dom and "curvax" in dom, f"{page}: the DOM lacks {expected!r}"


def test_readme_is_a_landing_page_whose_links_resolve():
  """README.md: at most 150 lines, the two commands first, `make docs` named, and every
  relative link (into docs/, the notebooks, the headline PNG) to a file that exists."""
  text = (REPO / "README.md").read_text()
  assert len(text.splitlines()) <= 150, len(text.splitlines())
  assert "make demo" in text.split("\n## ")[0] and "make test" in text.split("\n## ")[0]
  assert "make docs" in text and "docs/_build/html/index.html" in text
  links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
  assert any(link.startswith("docs/") for link in links)
  broken = [link for link in links if "://" not in link and not (REPO / link).exists()]
  assert not broken, f"README links to missing files: {broken}"


def test_benchmark_writers_find_their_markers():
  """The blocks benchmarks rewrite are where their writers look for them."""
  from benchmarks import time_to_loss, time_to_result
  for module in (time_to_loss, time_to_result):
    text = module.README.read_text()
    assert module._BEGIN in text and module._END in text, (module.__name__, module.README)
