"""Every notebook runs top to bottom, and its install cell is a no-op here."""

import os
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb")
)


def test_there_are_notebooks():
  assert len(NOTEBOOKS) == 5


COLAB = ("https://colab.research.google.com/github/optax-clipkit/optax_clipkit"
         "/blob/main/notebooks/")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_a_badge_and_an_install_cell(path):
  nb = nbformat.read(path, as_version=4)
  assert COLAB + path.name in nb.cells[0].source
  install = nb.cells[1].source
  assert "CLIPKIT_SKIP_INSTALL" in install and "[notebooks]" in install
  # It installs what the notebook imports beyond the package.
  code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
  imported = set(re.findall(r"^(?:import|from) (\w+)", code, re.MULTILINE))
  # The training code is in the notebook, not imported from task code.
  assert not re.search(r"import demo|optax_clipkit\.demo|benchmarks", code)
  for module in {"flax", "matplotlib", "sklearn"} & imported:
    assert f'"{module}"' in install, module
  assert "backend" in nb.cells[2].source  # Versions and backend printed.


# The default run executes every cell of each notebook with shorter training
# (the same code, fewer steps); the slow run executes the notebooks as shipped.
# Each replacement must match, so a notebook edit that drops one fails here.
SHORTER = {
    "01_exploding_mlp_regression": [("epochs=100", "epochs=20")],
    "02_rnn_long_sequences": [("steps=2000", "steps=300"),
                              ("steps=1000", "steps=150")],
    "03_per_module_ranges": [("steps=300", "steps=60")],
    "04_digits_classifier": [("EPOCHS = 30", "EPOCHS = 6")],
    # Keeps every corrupted batch (last at 210) and the bump (240-249).
    "05_spikes_and_guards": [("STEPS = 300", "STEPS = 255")],
}


def test_every_notebook_has_a_shorter_run():
  assert set(SHORTER) == {path.stem for path in NOTEBOOKS}


def execute(path, tmp_path, monkeypatch, replacements=()):
  monkeypatch.setenv("CLIPKIT_SKIP_INSTALL", "1")  # No network here.
  # The kernel imports this checkout's package, whatever else is installed.
  root = str(pathlib.Path(__file__).parent.parent)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p))
  nb = nbformat.read(path, as_version=4)
  for old, new in replacements:
    cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
    assert cells, (path.stem, old)
    for c in cells:
      c.source = c.source.replace(old, new)
  client = NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # Raises CellExecutionError on the first failing cell.
  errors = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images  # Every notebook plots.


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_shorter(path, tmp_path, monkeypatch):
  execute(path, tmp_path, monkeypatch, SHORTER[path.stem])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  execute(path, tmp_path, monkeypatch)
