"""The ``sd-jax`` command line, driven as a user would: subprocesses, files in, PNGs out.

Tiny random models (32x32 images).  Each subprocess pays a JAX start-up and, for a new
shape, a compilation; they share JAX's persistent compilation cache, so the three
model formats (same weights, same program) compile once.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_user_error, ok, run_cli
from tiny_models import build_tiny_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")


# ----------------------------------------------------------------------------- helpers
def run_many(arg_lists, **kw):
    """Several light commands (errors: start-up, no compilation) at once."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda a: run_cli(*a, **kw), arg_lists))


def files_under(folder) -> list[str]:
    if not os.path.exists(folder):
        return []
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """AUTOMATIC1111's ``parse_generation_parameters`` (modules/infotext_utils.py), in short."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in _PARAM.findall(last):
        out[k] = json.loads(v) if v[:1] == '"' and v[-1:] == '"' else v
    return out


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("models") / "tiny")
    build_tiny_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_ckpt(tiny, tmp_path_factory):
    """The tiny diffusers model converted by ``sd-jax convert`` (diffusers folder -> sd-jax)."""
    dest = tmp_path_factory.mktemp("ckpt") / "tiny-sdjax"
    p = ok(run_cli("convert", tiny, dest))
    assert "wrote sd-jax model" in p.stdout
    assert os.path.isfile(dest / "sd_jax.json") and os.path.isdir(dest / "params")
    assert os.listdir(dest.parent) == ["tiny-sdjax"]  # no temporary folder left beside it
    return str(dest)


def _sd1_shaped_models():
    """Tiny torch models in the shapes a single SD 1.x file implies (sd-jax reads heads, norm
    groups and the tokenizer from the SD 1.x originals): 8 UNet heads, 32 groups, 64-wide
    CLIP (one 64-channel head) over the real 49408-token vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=1, vocab_size=49408, max_position_embeddings=77,
                                      hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)).eval()
    unet = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=32).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)  # keep random-weight images in a sensible range
    models = {"text_encoder": te, "unet": unet, "vae": vae}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te.config.to_dict()}
    return models, configs


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    from sd_jax.weights.safetensors_io import save_file
    from sd_jax.weights.single_file import to_single_file
    models, configs = _sd1_shaped_models()
    sds = {k: {n: t.detach().numpy() for n, t in m.state_dict().items()} for k, m in models.items()}
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    save_file(to_single_file(configs, sds), str(path))
    return str(path), sds


# ----------------------------------------------------------------------------- generate
def test_generate_writes_pngs_with_metadata(tiny_ckpt, tmp_path):
    """txt2img on an sd-jax checkpoint: two PNGs (seeds 7, 8), A1111 ``parameters``, JSON chunk, AI
    marker; a prompt over 77 tokens is truncated with a one-line warning (``--prompt-syntax plain``)."""
    long_prompt = "a red circle on a blue square " * 12  # > 77 tokens
    out = tmp_path / "out" / "img.png"
    p = ok(run_cli("generate", long_prompt, "--negative", "a green, blurry triangle", "--model", tiny_ckpt,
                   "--seed", 7, "--steps", 3, "--guidance", 5.5, "--scheduler", "dpmpp_2m_karras",
                   "--size", "32x32", "--num", 2, "-o", out, "--prompt-syntax", "plain"))
    paths = [tmp_path / "out" / "img-0.png", tmp_path / "out" / "img-1.png"]
    assert p.stdout.split() == [str(x) for x in paths]
    assert files_under(tmp_path / "out") == ["img-0.png", "img-1.png"]
    warnings = [line for line in p.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("sd-jax: warning: prompt "), p.stderr
    assert "tokens long" in warnings[0] and ".py" not in warnings[0] and "PromptTruncatedWarning" not in p.stderr

    images = []
    for seed, path in zip((7, 8), paths):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
            text = dict(im.text)
            images.append(np.asarray(im))
        assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
        params = parse_a1111(text["parameters"])
        assert params["Prompt"] == long_prompt.strip() or params["Prompt"] == long_prompt
        assert params["Negative prompt"] == "a green, blurry triangle"
        assert params["Steps"] == "3" and params["Seed"] == str(seed) and params["Size"] == "32x32"
        assert params["CFG scale"] == "5.5" and params["Sampler"] == "DPM++ 2M" and params["Schedule type"] == "Karras"
        assert params["Model"] == "tiny-sdjax"
        meta = json.loads(text["sd-jax"])
        assert meta["prompt"] == long_prompt and meta["seed"] == seed and meta["steps"] == 3
        assert meta["scheduler"] == "dpmpp_2m_karras" and (meta["width"], meta["height"]) == (32, 32)
        assert meta["guidance"] == 5.5 and meta["negative_prompt"] == "a green, blurry triangle"
        assert text["AI-generated"] == "true"
        assert "trainedAlgorithmicMedia" in text["XML:com.adobe.xmp"]
    assert not np.array_equal(images[0], images[1])  # different seeds


def test_model_formats_give_the_same_image(single_file, tmp_path):
    """A single-file SD checkpoint, the sd-jax checkpoint ``convert`` makes of it, and the diffusers
    folder ``convert --to diffusers`` makes of that: same image for the same seed; diffusers
    PyTorch loads the converted folder, with the original weights."""
    path, sds = single_file
    ckpt, diff = tmp_path / "ckpt", tmp_path / "diffusers"
    # DEST exists: a folder that is not a model is refused, with --overwrite too (and left alone);
    # an empty folder or a model is replaced with --overwrite only.
    ckpt.mkdir()
    (ckpt / "keep.txt").write_text("x")
    assert_user_error(run_cli("convert", path, ckpt, "--overwrite"), "not a model")
    assert files_under(ckpt) == ["keep.txt"]
    (ckpt / "keep.txt").unlink()
    assert_user_error(run_cli("convert", path, ckpt), "already exists", "--overwrite")
    ok(run_cli("convert", path, ckpt, "--overwrite"))
    assert (ckpt / "sd_jax.json").is_file()
    ok(run_cli("convert", ckpt, diff, "--to", "diffusers"))
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "diffusers"]  # no temporary folders left

    got = {}
    for name, model in (("single", path), ("sdjax", ckpt), ("diffusers", diff)):
        out = tmp_path / "img" / f"{name}.png"
        ok(run_cli("generate", "a photo of a cat", "--model", model, "--seed", 3, "--steps", 3, "--size", "32x32",
                   "-o", out))
        got[name] = pixels(out)
        with Image.open(out) as im:
            assert parse_a1111(im.text["parameters"])["Sampler"] == "PLMS"  # the file's PNDM scheduler, kept
    assert got["single"].std() > 0
    np.testing.assert_array_equal(got["sdjax"], got["single"])
    np.testing.assert_array_equal(got["diffusers"], got["single"])

    import diffusers
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(diff), safety_checker=None,
                                                             requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    assert pipe.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    for comp in ("unet", "vae"):
        have = getattr(pipe, comp).state_dict()
        for k, v in sds[comp].items():
            np.testing.assert_allclose(have[k].numpy(), v, rtol=0, atol=0, err_msg=f"{comp}.{k}")
    te = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    for k, v in sds["text_encoder"].items():
        if k.endswith("position_ids"):
            continue
        np.testing.assert_array_equal(te[k.removeprefix("text_model.")].numpy(), v, err_msg=k)


def test_img2img_and_inpainting(tiny, tmp_path):
    """img2img and inpainting with an ordinary model (latent blending: under an all-black mask
    nothing is repainted, so the image does not depend on the seed), and with a 9-channel
    inpainting model (in bf16)."""
    rng = np.random.default_rng(0)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(init)
    black, half = tmp_path / "black.png", tmp_path / "half.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(black)
    m = np.zeros((32, 32), np.uint8)
    m[:, 16:] = 255
    Image.fromarray(m).save(half)

    ok(run_cli("generate", "a red circle", "--model", tiny, "--init-image", init, "--strength", 0.5, "--steps", 4,
               "--size", "32x32", "--num", 2, "-o", tmp_path / "i2i" / "x.png"))
    a, b = pixels(tmp_path / "i2i" / "x-0.png"), pixels(tmp_path / "i2i" / "x-1.png")
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    with Image.open(tmp_path / "i2i" / "x-0.png") as im:
        params = parse_a1111(im.text["parameters"])
        assert params["Denoising strength"] == "0.5" and json.loads(im.text["sd-jax"])["mode"] == "img2img"

    ok(run_cli("generate", "a red circle", "--model", tiny, "--init-image", init, "--mask", black, "--strength", 1.0,
               "--steps", 4, "--size", "32x32", "--num", 2, "-o", tmp_path / "inp" / "x.png"))
    c, d = pixels(tmp_path / "inp" / "x-0.png"), pixels(tmp_path / "inp" / "x-1.png")
    np.testing.assert_array_equal(c, d)  # nothing to repaint: the (re-encoded) init image, whatever the seed
    assert not np.array_equal(c, a)

    tiny9 = str(tmp_path / "tiny9")
    build_tiny_pipeline(tiny9, in_channels=9)
    p = run_cli("generate", "a red circle", "--model", tiny9, "--size", "32x32", "-o", tmp_path / "no" / "x.png")
    assert_user_error(p, "inpainting model", "--init-image", "--mask")
    assert not (tmp_path / "no").exists()
    ok(run_cli("generate", "a red circle", "--model", tiny9, "--init-image", init, "--mask", half, "--steps", 3,
               "--size", "32x32", "--num", 2, "--dtype", "bf16", "-o", tmp_path / "inp9" / "x.png"))
    e, f = pixels(tmp_path / "inp9" / "x-0.png"), pixels(tmp_path / "inp9" / "x-1.png")
    assert e.shape == (32, 32, 3) and e.std() > 0 and not np.array_equal(e, f)
    with Image.open(tmp_path / "inp9" / "x-0.png") as im:
        assert json.loads(im.text["sd-jax"])["mode"] == "inpaint"


def test_info():
    p = ok(run_cli("info", devices=4, env={"SD_JAX_MODEL": "/nonexistent/model"}))
    text = p.stdout
    assert "backend: cpu" in text and "devices: 4 (cpu)" in text and "local: 4" in text
    assert "default model: /nonexistent/model (from $SD_JAX_MODEL) (missing)" in text
    assert re.search(r"^compilation cache: /", text, re.M) and "dtype:" in text


# ----------------------------------------------------------------------------- errors
def test_argument_errors_are_one_line(tiny, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["generate", "x", "--model", tiny, "--size", "30x32", "-o", out / "a.png"], ["--size", "multiples of 8"]),
        (["generate", "x", "--model", tiny, "--scheduler", "fancy", "-o", out / "a.png"],
         ["unknown scheduler 'fancy'", "euler_a"]),
        (["generate", "x", "--model", tiny, "--scheduler", "ddim_karras", "-o", out / "a.png"],
         ["unknown scheduler 'ddim_karras'"]),
        (["generate", "x", "--model", tiny, "--mask", tmp_path / "m.png", "-o", out / "a.png"], ["--init-image"]),
        (["generate", "x", "--model", tiny, "-o", out / "a.jpg"], ["must end in .png"]),
        (["generate", "x", "--model", tiny, "--guidance-end", "0", "-o", out / "a.png"],
         ["--guidance-end 0.0", "start < end"]),
        (["generate", "x", "--model", tmp_path / "missing", "-o", out / "a.png"], ["not found", "--model"]),
        (["batch", tmp_path / "none.txt", "--out", out, "--model", tiny], ["prompt file", "not found"]),
    ]
    for (args, fragments), p in zip(cases, run_many([args for args, _ in cases])):
        assert_user_error(p, *fragments)
    assert not out.exists()


def test_missing_default_model(tmp_path, monkeypatch, capsys):
    """Without the shipped model (e.g. a wheel install without checkpoints/), a clear error."""
    from sd_jax import cli, commands
    monkeypatch.delenv("SD_JAX_MODEL", raising=False)
    monkeypatch.setattr(commands, "default_model", lambda: str(tmp_path / "no-model-here"))
    assert cli.main(["generate", "x", "-o", str(tmp_path / "out" / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd-jax: error:") and err.count("\n") == 1, err
    for fragment in ("default model", "--model", "SD_JAX_MODEL"):
        assert fragment in err, err
    assert not (tmp_path / "out").exists()


def test_malformed_models_are_one_line(tiny, tiny_ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(100))
    broken_diffusers = tmp_path / "broken-diffusers"
    shutil.copytree(tiny, broken_diffusers)
    (broken_diffusers / "unet" / "config.json").write_text("{ oops")
    broken_ckpt = tmp_path / "broken-ckpt"
    shutil.copytree(tiny_ckpt, broken_ckpt)
    (broken_ckpt / "sd_jax.json").write_text("")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02")
    out = tmp_path / "out"
    models = (empty, junk, broken_diffusers, broken_ckpt, pickle)
    *runs, conv = run_many([("generate", "x", "--model", m, "-o", out / "a.png") for m in models]
                           + [("convert", broken_diffusers, out / "m")])
    for model, p in zip(models, runs):
        line = assert_user_error(p)
        assert str(model) in line or model.name in line, line
    assert_user_error(conv, "not valid JSON")
    assert not out.exists()


def test_out_of_memory_and_bugs(monkeypatch, capsys):
    """Out of device memory: one line naming the settings to lower; a bug keeps its traceback."""
    import jax

    from sd_jax import cli, commands

    def oom(args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB.")

    monkeypatch.setattr(commands, "generate", oom)
    assert cli.main(["generate", "x", "-o", "a.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sd-jax: error: out of device memory") and "--num" in err
    monkeypatch.setattr(commands, "batch", oom)
    assert cli.main(["batch", "p.txt", "--out", "o"]) == 2
    assert "--batch-size" in capsys.readouterr().err

    def bug(args):
        return np.zeros(3).reshape(2, 2)  # a ValueError from numpy: a bug, not a user error

    monkeypatch.setattr(commands, "info", bug)
    with pytest.raises(ValueError, match="reshape"):
        cli.main(["info"])
    monkeypatch.setattr(commands, "info", lambda args: None + 1)
    with pytest.raises(TypeError):
        cli.main(["info"])
    monkeypatch.setattr(commands, "info", lambda args: (_ for _ in ()).throw(commands.UsageError("fix this\nmore")))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "sd-jax: error: fix this\n"


def test_size_must_suit_the_model():
    """SD 1.x/2.x (an 8x VAE) takes any multiple of 8, as diffusers does."""
    from types import SimpleNamespace

    from sd_jax import commands
    sd = SimpleNamespace(models=SimpleNamespace(vae_scale=8, unet=SimpleNamespace(
        config=SimpleNamespace(block_out_channels=(320, 640, 1280, 1280)))))
    assert commands.size_multiple(sd) == 8
    commands.check_size(sd, 768, 512)
    commands.check_size(sd, 520, 512)
    with pytest.raises(commands.UsageError, match="516x512: this model needs both sides to be multiples of 8"):
        commands.check_size(sd, 516, 512)


def test_guidance_window_in_the_png_parameters_round_trips():
    """--guidance-start/--guidance-end go into the A1111 parameters when set (sd-jax's own fields,
    which A1111 keeps) and come back as generate's options from --from-png."""
    from sd_jax import infotext
    from sd_jax.images import a1111_parameters
    meta = {"prompt": "a red circle", "steps": 20, "guidance": 7.5, "seed": 3, "width": 64, "height": 64,
            "scheduler": "ddim"}
    assert "Guidance" not in a1111_parameters({**meta, "guidance_start": 0.0, "guidance_end": 1.0})
    text = a1111_parameters({**meta, "guidance_start": 0.1, "guidance_end": 0.8})
    assert "Guidance start: 0.1, Guidance end: 0.8" in text
    found, warnings = infotext.generate_settings(infotext.parse_parameters(text))
    assert (found["guidance_start"], found["guidance_end"], found["guidance"]) == (0.1, 0.8, 7.5) and not warnings
    from sd_jax.cli import build_parser
    args = build_parser(found).parse_args(["generate"])
    assert (args.guidance_start, args.guidance_end) == (0.1, 0.8)
