"""What sd-jax tells the user: one-line refusals, warnings silenced, metadata others read right.

CLI checks run the shipped model (checkpoints/sd-jax-shapes) at 64x64 in subprocesses.
"""
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_user_error, ok, run_cli
from sd_jax import images
from sd_jax.models import attention as attn
from sd_jax.weights.convert import state_dict_to_params
from sd_jax.weights.safetensors_io import CheckpointError

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")
FAST = ["--model", MODEL, "--size", "64x64", "--steps", "2"]


# ----------------------------------------------------------------------------- --attention cudnn
def test_cudnn_attention_refused_where_cudnn_cannot_run(monkeypatch):
    """Python API: a ValueError when the model is configured, naming where cuDNN runs and the
    alternatives (not a RuntimeError from inside the first compilation)."""
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "cpu")
    with pytest.raises(ValueError, match=r"'cudnn' runs only on NVIDIA GPUs.*cpu here.*'auto'.*'xla'"):
        attn.check_impl("cudnn")
    for name in ("auto", "xla", "chunked"):
        assert attn.check_impl(name) == name
    from jax._src.cudnn import fused_attention_stablehlo as fused
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90000)      # a CUDA build with cuDNN
    assert attn.check_impl("cudnn") == "cudnn"

    def no_cudnn():
        raise RuntimeError("cuDNN is not detected.")
    monkeypatch.setattr(fused, "check_cudnn_version", no_cudnn)           # e.g. ROCm
    with pytest.raises(ValueError, match="has no cuDNN"):
        attn.check_impl("cudnn")


def test_cli_cudnn_attention_on_cpu_is_one_line(tmp_path):
    p = run_cli("generate", "a red circle", "--attention", "cudnn", *FAST, "-o", tmp_path / "x.png",
                env={"JAX_PLATFORMS": "cpu"})
    assert_user_error(p, "--attention cudnn", "NVIDIA GPU", "cpu", "'xla'")
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------- Clip skip numbering
def test_a1111_clip_skip_counts_the_last_layer_used():
    """A1111's ``Clip skip`` n reads hidden_states[-n] (1 = last layer, left out when 1);
    sd-jax's / diffusers' clip_skip k reads hidden_states[-(k + 1)]."""
    base = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    assert "Clip skip" not in images.a1111_parameters({**base, "clip_skip": None})
    assert "Clip skip" not in images.a1111_parameters({**base, "clip_skip": 0})
    assert "Clip skip: 2," in images.a1111_parameters({**base, "clip_skip": 1})
    assert "Clip skip: 3," in images.a1111_parameters({**base, "clip_skip": 2})


def _no_torch_env(tmp_path) -> dict:
    """An environment in which ``import torch`` fails (as on a machine without PyTorch)."""
    site = tmp_path / "no_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_generate_metadata_and_quiet_stderr(tmp_path):
    """``--clip-skip 1`` is written ``Clip skip: 2`` in A1111's field and ``clip_skip: 1`` (with its
    meaning) in sd-jax's JSON, read back as written; and a successful generate on a machine
    without PyTorch prints no transformers "PyTorch was not found" warning."""
    out = tmp_path / "skip.png"
    p = ok(run_cli("generate", "a red circle", *FAST, "--clip-skip", "1", "-o", out, env=_no_torch_env(tmp_path)))
    assert "PyTorch was not found" not in p.stderr and "[transformers]" not in p.stderr, p.stderr
    with Image.open(out) as im:
        params, raw = im.text["parameters"], json.loads(im.text["sd-jax"])
    assert re.search(r"(^|, )Clip skip: 2(,|$)", params.splitlines()[-1]), params
    assert raw["clip_skip"] == 1 and "A1111" in raw["clip_skip_note"] and "+ 1" in raw["clip_skip_note"]
    meta = images.read_metadata(str(out))
    assert meta["clip_skip"] == 1 and "clip_skip_note" not in meta


# ----------------------------------------------------------------------------- mis-shaped tensors
def test_misshaped_tensor_listed_once_in_pytorch_layout():
    f32 = np.float32
    shapes = {"proj": {"kernel": jax.ShapeDtypeStruct((4, 8), f32), "bias": jax.ShapeDtypeStruct((8,), f32)},
              "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 5), f32), "bias": jax.ShapeDtypeStruct((5,), f32)},
              "norm": {"scale": jax.ShapeDtypeStruct((5,), f32)}}
    sd = {"proj.weight": np.zeros((8, 3), f32), "proj.bias": np.zeros(8, f32),
          "conv.weight": np.zeros((5, 2, 1, 1), f32), "conv.bias": np.zeros(5, f32)}
    with pytest.raises(CheckpointError) as e:
        state_dict_to_params(sd, shapes, what="unet")
    msg = str(e.value)
    assert msg.count("proj.weight") == 1 and msg.count("conv.weight") == 1, msg
    assert "proj.weight (8, 3) (model wants (8, 4))" in msg
    assert "conv.weight (5, 2, 1, 1) (model wants (5, 2, 3, 3))" in msg
    assert "1 missing: norm.weight;" in msg and "2 with the wrong shape" in msg


def test_cli_misshaped_checkpoint_is_one_line(tmp_path):
    from safetensors.numpy import load_file, save_file
    model = tmp_path / "model"
    shutil.copytree(MODEL, model)
    path = model / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    want = sd["conv_in.weight"].shape
    sd["conv_in.weight"] = np.zeros(want[:2] + (1, 1), sd["conv_in.weight"].dtype)
    save_file(sd, str(path))
    p = run_cli("generate", "a red circle", "--model", model, "--size", "64x64", "--steps", "2",
                "-o", tmp_path / "x.png")
    line = assert_user_error(p, f"conv_in.weight {want[:2] + (1, 1)} (model wants {tuple(want)})")
    assert "missing" not in line and line.count("conv_in.weight") == 1


# ----------------------------------------------------------------------------- batch size and pixels
def test_batch_size_changes_pixels_by_at_most_one_grey_level():
    """What README says about batches, measured: the same batch size on the same devices gives
    the same pixels bit for bit, whatever the image's position and its neighbours; another batch
    size or device count moves a pixel by at most one grey level, in few pixels (XLA sums some
    reductions in an order that depends on the batch shape)."""
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    one = StableDiffusionPipeline.from_pretrained(MODEL, mesh=sharding.make_mesh(jax.devices()[:1]))
    many = StableDiffusionPipeline.from_pretrained(MODEL)       # every (fake) device: batch 4 padded to 8
    prompts = ["a red circle on a blue background", "a small green square", "a yellow triangle", "a purple circle",
               "a white square"]
    kw = dict(num_inference_steps=2, height=64, width=64, scheduler="dpmpp_2m", guidance_scale=2.0, output_type="np")

    def gen(pipe, idx):
        return pipe([prompts[i] for i in idx], seed=[100 + i for i in idx], **kw).astype(int)

    batch = gen(one, [0, 1, 2, 3])
    np.testing.assert_array_equal(gen(one, [3, 2, 1, 0])[::-1], batch)         # position in the batch
    np.testing.assert_array_equal(gen(one, [0, 4, 4, 4])[0], batch[0])        # the other prompts
    alone = np.concatenate([gen(one, [i]) for i in range(4)])
    spread = gen(many, [0, 1, 2, 3])
    assert len(many.mesh.devices.flat) > 1
    for other in (batch, spread):
        diff = np.abs(other - alone)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
