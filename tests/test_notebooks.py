"""notebooks/: the committed notebooks are what scripts/make_notebooks.py writes (without outputs),
and each runs top to bottom on the embedded model (executed with nbclient; a failing cell fails)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart.ipynb", "policies.ipynb")


def _missing() -> list[str]:
    return [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]


@pytest.mark.skipif(bool(_missing()), reason=f"the notebooks extra is not installed (pip install -e .[notebooks]: "
                    f"missing {', '.join(_missing())})")
def test_the_committed_notebooks_are_the_generators_and_carry_no_outputs():
    out = subprocess.run([sys.executable, "scripts/make_notebooks.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), name


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing()), reason=f"the notebooks extra is not installed (pip install -e .[notebooks]: "
                    f"missing {', '.join(_missing())})")
@pytest.mark.skipif(os.environ.get("KVJAX_NOTEBOOKS") != "1",
                    reason="executing the notebooks takes minutes: `make notebooks` (CI runs it after the suite)")
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_the_notebook_runs_top_to_bottom_on_the_embedded_model(name, smollm2_dir, tmp_path):
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except CellExecutionError as e:  # the failing cell's source and traceback
        pytest.fail(f"{name}: a cell failed:\n{e}")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure"
