"""Both notebooks run top to bottom on the CPU (nbclient), with small settings.

The parameter cell (tagged "parameters") is replaced by small settings and a tiny
random model, exactly as a user would edit it; every other cell runs as shipped.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tiny_models import build_tiny_pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
NB = os.path.join(HERE, "..", "notebooks")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("nb_model"))
    build_tiny_pipeline(folder)
    return folder


def run(name, params, cwd):
    nb = nbformat.read(os.path.join(NB, name), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one parameter cell"
    cells[0].source = params
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs_text(nb):
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") or str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_quickstart_runs(model, tmp_path):
    nb = run("quickstart.ipynb", f'MODEL = {model!r}\nOWN_MODEL = {model!r}\nSTEPS = 3\nGUIDANCE = 5.0\n'
                                 f'PER_DEVICE = 1\nSIZE = 32\n', tmp_path)
    text = outputs_text(nb)
    assert "backend: cpu" in text and "images/s" in text and "second call" in text
    assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 4


def test_training_notebook_runs(model, tmp_path):
    nb = run("training.ipynb", f'BASE_MODEL = {model!r}\nDATA_DIR = None\nOUT = {str(tmp_path / "ft")!r}\n'
                               f'STEPS = 4\nBATCH = 8\nLR = 1e-4\nSAMPLE_STEPS = 2\n', tmp_path)
    text = outputs_text(nb)
    assert "stopped at step 2 (finished: False)" in text and "finished at step 4" in text
    assert os.path.isfile(tmp_path / "ft" / "run" / "loss.jsonl")
