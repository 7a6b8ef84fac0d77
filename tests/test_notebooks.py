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
    # nbclient waits only iopub_timeout (4 s by default) for a cell's outputs after its reply and
    # then silently drops the rest: on a loaded 2-core machine a line went missing that way.
    # Wait longer, and fail loudly if outputs are still lost. coalesce_streams: one print() that
    # the kernel flushed in two pieces is one text again.
    NotebookClient(nb, timeout=900, kernel_name="python3", iopub_timeout=120, raise_on_iopub_timeout=True,
                   coalesce_streams=True, resources={"metadata": {"path": str(cwd)}}).execute()
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
                               f'STEPS = 4\nBATCH = 8\nLR = 1e-4\nSAMPLE_STEPS = 2\n'
                               f'LORA_STEPS = 1\nLORA_RANK = 2\nLORA_LR = 5e-2\n', tmp_path)
    text = outputs_text(nb)
    assert "stopped at step 2 (finished: False)" in text and "finished at step 4" in text
    assert os.path.isfile(tmp_path / "ft" / "run" / "loss.jsonl")
    # the LoRA section: both files written, and generating with the LoRA changes the images
    import re
    assert "LoRA finished at step 1; files: ['lora-run.safetensors', 'pytorch_lora_weights.safetensors']" in text
    assert int(re.search(r"the LoRA moves the images by up to (\d+) grey levels", text).group(1)) > 0


def test_sdxl_and_adapters_notebook_runs(tmp_path, monkeypatch):
    """Tiny random SDXL base + refiner, a random kohya LoRA, an embedding and a random ControlNet."""
    import re
    # one CPU device, as on a user's machine (conftest's 8 fake devices would pad each image to 8)
    monkeypatch.setenv("XLA_FLAGS", " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                             if "device_count" not in f))
    nb = run("sdxl_and_adapters.ipynb", "SDXL_BASE = None\nSDXL_REFINER = None\nCONTROLNET = None\nSTEPS = 3\n"
                                        "GUIDANCE = 5.0\nSIZE = None\n", tmp_path)
    text = outputs_text(nb)
    assert "backend: cpu, 1 device(s)" in text
    assert "prompt_2 and micro-conditioning: 0 recompilations" in text
    assert "refiner output: (1, 64, 64, 3) float32; ensemble programs compiled: 1" in text
    # LoRA: two weights give other images, nothing recompiled, unloading restores the base bit for bit
    assert int(re.search(r"LoRA weight 1.0 vs 0.4: (\d+) grey levels apart", text).group(1)) > 0
    assert "unloaded equals the image before: True" in text and "LoRA recompilations: 0" in text
    assert "<lora:watercolor:0.4> equals load_lora at 0.4: True; loaded after the call: {}; recompilations: 0" in text
    assert "embeddings added: ['glowstyle']" in text
    # ControlNet: the further from scale 0, the more the image changes; one program for every scale
    far = {float(s): float(d) for s, d in re.findall(r"scale ([\d.]+): ([\d.]+)", text)}
    assert far[0.0] == 0.0 and 0.0 < far[0.5] < far[1.0], far
    assert "ControlNet programs compiled: 1" in text
    assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) >= 7
    assert os.path.isfile(tmp_path / "sdxl-adapters-files" / "loras" / "watercolor.safetensors")
