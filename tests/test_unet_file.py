"""A UNet-only ``.safetensors`` (SDXL-Lightning's ``*_unet.safetensors``) in place of a model's
UNet: ``from_pretrained(path, unet=FILE)``, ``--unet FILE``.

The base model is the tiny random SDXL of ``test_single_file_sdxl``; the replacement UNet
is another diffusers UNet of the same config (other seed), saved in float16 as Lightning's
files are, with diffusers key names or the original layout's ``model.diffusion_model.*``.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.weights.safetensors_io import CheckpointError, save_file  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from test_single_file_sdxl import build_sdxl
    root = tmp_path_factory.mktemp("unet_file")
    folder = str(root / "model")
    sds, configs = build_sdxl(folder)
    torch.manual_seed(7)
    other = UNet2DConditionModel.from_config(configs["unet"])
    unet_sd = {k: v.detach().numpy().astype(np.float16) for k, v in other.state_dict().items()}
    path = str(root / "lightning_unet.safetensors")
    save_file(unet_sd, path)
    return folder, sds, configs, unet_sd, path


@pytest.fixture(scope="module")
def base(model):
    from sd_jax.weights import loader
    return loader.load(model[0])


def _assert_params(params, want):
    from sd_jax.weights.convert import params_to_state_dict
    got = params_to_state_dict(params)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)


def test_from_pretrained_with_unet_file(model):
    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.weights.convert import params_to_state_dict
    folder, sds, _, unet_sd, path = model
    pipe = StableDiffusionPipeline.from_pretrained(folder, unet=path)
    _assert_params(pipe.params["unet"], unet_sd)
    te = params_to_state_dict(pipe.params["text_encoder_2"])   # the rest is the base model's
    np.testing.assert_array_equal(te["text_projection.weight"], sds["text_encoder_2"]["text_projection.weight"])


def test_unet_file_in_the_original_layout(model, base, tmp_path):
    from sd_jax.weights import loader
    from sd_jax.weights import single_file as sf
    _, sds, configs, unet_sd, _ = model
    single = sf.to_single_file(configs, {**sds, "unet": unet_sd})
    path = str(tmp_path / "unet_sgm.safetensors")
    save_file({k: v for k, v in single.items() if k.startswith("model.diffusion_model.")}, path)
    _assert_params(loader.with_unet(base, path).params["unet"], unet_sd)


def test_unet_that_does_not_fit(model, base, tmp_path, capsys):
    from diffusers import UNet2DConditionModel
    from sd_jax import cli
    from sd_jax.weights import loader
    folder, _, configs, _, _ = model
    torch.manual_seed(0)
    wrong = UNet2DConditionModel.from_config({**configs["unet"], "cross_attention_dim": 64})   # SD-1.x-like width
    path = str(tmp_path / "wrong.safetensors")
    save_file({k: v.detach().numpy() for k, v in wrong.state_dict().items()}, path)
    with pytest.raises(CheckpointError, match=r"--unet .*wrong.safetensors does not fit the sdxl model's UNet") as e:
        loader.with_unet(base, path)
    msg = str(e.value)
    assert "\n" not in msg and "wrong shape" in msg and "attn2.to_k.weight" in msg
    with pytest.raises(CheckpointError, match="not found"):
        loader.with_unet(base, str(tmp_path / "missing.safetensors"))
    code = cli.main(["generate", "a cat", "--model", folder, "--unet", str(tmp_path / "missing.safetensors"),
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("sd-jax: error: ") and "not found" in err, err
    assert not (tmp_path / "x.png").exists()
