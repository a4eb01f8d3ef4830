"""Every Python example in README.md and docs/ runs.

The ```python blocks of each page run in order in one namespace, so a page
reads like a notebook.
"""

import pathlib
import re

import jax
import pytest

ROOT = pathlib.Path(__file__).parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def blocks(path):
  return re.findall(r"^```python\n(.*?)^```", path.read_text(),
                    re.MULTILINE | re.DOTALL)


def test_pages_have_examples():
  assert blocks(ROOT / "README.md") and blocks(ROOT / "docs" / "per_module.md")


@pytest.mark.parametrize("path", [p for p in PAGES if blocks(p)],
                         ids=lambda p: p.name)
def test_examples_run(path):
  namespace = {"__name__": f"docs_{path.stem}"}
  # JAX's default promotion rules, as users run the examples.
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for code in blocks(path):
      exec(compile(code, str(path), "exec"), namespace)  # pylint: disable=exec-used
