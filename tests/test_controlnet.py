"""ControlNet against diffusers 0.42 (fp32) on tiny random models saved by diffusers.

The ControlNets are ``ControlNetModel.from_unet`` of the tiny UNet of tests/tiny_models.py
with every zero convolution (``controlnet_down_blocks``, ``controlnet_mid_block``,
``controlnet_cond_embedding.conv_out``) given non-zero random weights: with the zero
initialisation a ControlNet changes nothing and a comparison would prove nothing.

Tolerances: residuals <= 1e-4 (measured ~1e-6); images (float32 in [0, 1]) within 1e-4, well
inside the issue's 2/255 (measured on the dev VM, 2026-11-29: <= 6e-7, float32 on both sides).
"""
import os

import numpy as np
import pytest

from tiny_models import build_tiny_pipeline, nchw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 32            # pixels; the tiny VAE downsamples by 2 -> 16x16 latents
STEPS = 5
RES_TOL = 1e-4
IMG_TOL = 1e-4       # tighter than the 2/255: measured 5.4e-7 .. 6e-7
PROMPT = "a small red circle at the top left on a blue background"


def _torch_controlnet(unet, seed, folder, variant=None):
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn_like(p))
    cn.save_pretrained(folder, variant=variant)
    # Reload, so the reference uses exactly what sd-jax reads (fp16-rounded for the variant).
    return diffusers.ControlNetModel.from_pretrained(folder, variant=variant).eval()


def _control_image(seed, size=SIZE):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn_tiny")
    ref = build_tiny_pipeline(str(root / "sd"))
    cn_a = _torch_controlnet(ref.unet, 1, str(root / "cn_a"))
    cn_b = _torch_controlnet(ref.unet, 2, str(root / "cn_b"), variant="fp16")
    return root, ref, cn_a, cn_b


def test_residuals_match_diffusers(tiny):
    import jax
    import jax.numpy as jnp

    from sd_jax.models import controlnet
    root, _, cn_a, _ = tiny
    model, params = controlnet.load(str(root / "cn_a"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    img = rng.uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    t = np.array([981, 401])
    # Scale 0.7 per sample (traced); guess mode is compared in the img2img pipeline test.
    with torch.no_grad():
        down_ref, mid_ref = cn_a(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(img),
                                 conditioning_scale=0.7, return_dict=False)
    down, mid = jax.jit(model.apply)({"params": params}, x, t, ctx, img, jnp.full((2,), 0.7))
    assert len(down) == len(down_ref)
    for ours, theirs in zip(list(down) + [mid], list(down_ref) + [mid_ref]):
        theirs = theirs.numpy().transpose(0, 2, 3, 1)
        assert ours.shape == theirs.shape
        assert np.abs(theirs).max() > 0.1            # the zero convs are not zero
        assert np.abs(np.asarray(ours) - theirs).max() <= RES_TOL


@pytest.fixture(scope="module")
def pipes(tiny):
    from sd_jax.pipeline import StableDiffusionPipeline
    root, ref, cn_a, cn_b = tiny
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "sd"))
    assert pipe.load_controlnet(str(root / "cn_a")) == "cn_a"
    assert pipe.load_controlnet(str(root / "cn_b"), variant="fp16") == "cn_b"
    parts = dict(vae=ref.vae, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer, unet=ref.unet,
                 scheduler=ref.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    one = diffusers.StableDiffusionControlNetPipeline(controlnet=cn_a, **parts)
    two = diffusers.StableDiffusionControlNetImg2ImgPipeline(controlnet=[cn_a, cn_b], **parts)
    for p in (one, two):
        p.set_progress_bar_config(disable=True)
    return pipe, one, two


def _latents(seed=0):
    return np.random.RandomState(seed).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def _compare(ours, theirs):
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    diff = np.abs(ours - theirs).max()
    print(f"max |diff| {diff:.2e}")
    assert diff <= IMG_TOL, diff


def test_txt2img_matches_diffusers_and_scale_is_traced(pipes):
    pipe, one, _ = pipes
    img = _control_image(5)
    lat = _latents()
    outs = []
    for scale, window in ((0.7, (0.1, 0.8)), (0.3, (0.0, 0.5))):
        with torch.no_grad():
            want = one(PROMPT, negative_prompt="a green square", image=img, latents=nchw(lat), num_inference_steps=STEPS,
                       guidance_scale=7.5, height=SIZE, width=SIZE, controlnet_conditioning_scale=scale,
                       control_guidance_start=window[0], control_guidance_end=window[1], output_type="np").images
        before = pipe.compilations
        got = pipe(PROMPT, "a green square", latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE,
                   width=SIZE, scheduler="ddim", output_type="np", control_image=img, controlnet="cn_a",
                   controlnet_conditioning_scale=scale, control_guidance_start=window[0],
                   control_guidance_end=window[1])
        _compare(got, want)
        outs.append((got, pipe.compilations - before))
    assert outs[1][1] == 0                                   # new scale and window: no recompilation
    assert np.abs(outs[0][0] - outs[1][0]).max() > 100 * IMG_TOL  # and they change the image (measured 0.025)


def test_two_controlnets_guess_mode_img2img_match_diffusers(pipes, monkeypatch):
    """Two ControlNets (0.5, 0.8) in guess mode, img2img, a guidance window: the window is over
    the steps that run (3 of 5 at strength 0.6), as in diffusers."""
    from diffusers.models.autoencoders import vae as dvae
    from diffusers.pipelines.controlnet import pipeline_controlnet_img2img as mod
    pipe, _, two = pipes
    # sd-jax encodes init images to the posterior mean; so does the reference here.
    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    noise = _latents(1)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: nchw(noise))
    init = (np.random.RandomState(2).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    imgs = [_control_image(6), _control_image(7, size=48)]   # the second is resized to the output size
    with torch.no_grad():
        want = two(PROMPT, image=torch.from_numpy(init[None].transpose(0, 3, 1, 2) / 127.5 - 1).float(),
                   control_image=imgs, strength=0.6, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE,
                   width=SIZE, controlnet_conditioning_scale=[0.5, 0.8], control_guidance_start=0.1,
                   control_guidance_end=0.8, guess_mode=True, output_type="np").images
    got = pipe(PROMPT, image=init, strength=0.6, latents=noise, num_inference_steps=STEPS, guidance_scale=5.0,
               height=SIZE, width=SIZE, scheduler="ddim", output_type="np", control_image=imgs,
               controlnet_conditioning_scale=[0.5, 0.8], control_guidance_start=0.1, control_guidance_end=0.8,
               guess_mode=True)
    _compare(got, want)


def test_bad_input_is_one_clear_line(tiny, pipes, tmp_path):
    from sd_jax.request import RequestError
    root, ref, _, _ = tiny
    pipe = pipes[0]
    kw = dict(num_inference_steps=2, height=SIZE, width=SIZE, scheduler="ddim")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        (dict(control_image=str(text), controlnet="cn_a"), "control image .*notes.txt' is not a readable image"),
        (dict(control_image=_control_image(1), controlnet="cn_a", controlnet_conditioning_scale="strong"),
         "controlnet_conditioning_scale must be a number, got 'strong'"),
        (dict(control_image=_control_image(1), controlnet="cn_a", control_guidance_start=0.6,
              control_guidance_end=0.6),
         r"control_guidance_start \(0.6\) must be below control_guidance_end \(0.6\)"),
        (dict(control_image=[_control_image(1)]), "1 control image.* for 2 ControlNet"),
        (dict(control_image=_control_image(1), controlnet="canny"), "no ControlNet 'canny' is loaded"),
    ]
    for extra, message in cases:
        with pytest.raises(RequestError, match=message) as e:
            pipe(PROMPT, **kw, **extra)
        assert "\n" not in str(e.value)
    # A ControlNet made for another base model (a 64-wide cross-attention) is refused at load.
    other = diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16))
    cfg = dict(other.config)
    cfg["cross_attention_dim"] = 64
    diffusers.ControlNetModel.from_config(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="ControlNet other does not fit this model: its cross-attention width "
                                         "is 64, the model's 32") as e:
        pipe.load_controlnet(str(tmp_path / "other"))
    assert "\n" not in str(e.value) and len(pipe.controlnets) == 2


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")


def test_cli_canny_control_and_metadata(tmp_path, capsys):
    """``sd-jax generate --controlnet PATH --control canny:IMAGE:SCALE`` on the shipped model
    (in-process): the edges are computed with OpenCV, the PNG's A1111 parameters name the
    ControlNet; a --control without its --controlnet is one clear line."""
    from sd_jax import cli
    from sd_jax.images import read_metadata
    unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(SHIPPED, "unet"))
    torch.manual_seed(0)
    diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16)).save_pretrained(
        tmp_path / "cn_shapes")
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 16:48] = 255
    from PIL import Image
    Image.fromarray(img).save(tmp_path / "square.png")
    out = tmp_path / "out.png"
    common = ["generate", "a red circle", "--model", SHIPPED, "--size", "64x64", "--steps", "2", "-o", str(out),
              "--no-progress"]
    assert cli.main(common + ["--control", f"canny:{tmp_path / 'square.png'}:0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sd-jax: error: 0 --controlnet and 1 --control given")
    assert cli.main(common + ["--controlnet", str(tmp_path / "cn_shapes"),
                              "--control", f"canny:{tmp_path / 'square.png'}:0.5"]) == 0
    with Image.open(out) as im:
        params = im.text["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: cn_shapes, Weight: 0.5, Guidance Start: 0.0, Guidance End: 1.0"' \
        in params
    assert read_metadata(str(out))["controlnets"][0]["model"] == "cn_shapes"


def test_canny_is_opencv_canny():
    import cv2

    from sd_jax.control import canny, parse_control
    img = np.asarray(_control_image(3, size=40))
    edges = np.asarray(canny(img))
    assert edges.shape == (40, 40, 3) and (edges[..., 0] == cv2.Canny(img, 100, 200)).all() and edges.any()
    assert parse_control("depth:a:b.png:0.25") == ("depth", "a:b.png", 0.25)
    assert parse_control("pose:x.png") == ("pose", "x.png", 1.0)


def test_sd15_full_width_key_mapping():
    """SD 1.5's ControlNet (lllyasviel/sd-controlnet-*: 320..1280 wide, 768 context, 361M
    parameters): every diffusers key maps to a parameter of the model's own shape and none is
    left over (a forward pass at this width is not run here: test_residuals_match_diffusers
    covers the arithmetic on the same code)."""
    from sd_jax.models.controlnet import ControlNetConfig, ControlNetModel
    from sd_jax.models.unet import UNetConfig
    from sd_jax.weights.convert import flatten, state_dict_to_params
    with torch.device("meta"):
        cn = diffusers.ControlNetModel(cross_attention_dim=768)
    cfg = ControlNetConfig.from_dict(dict(cn.config))
    assert cfg.mismatch(UNetConfig.sd15(), 4) is None and cfg.mismatch(UNetConfig.sd21(), 4)
    shapes = ControlNetModel(cfg).param_shapes()
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in cn.state_dict().items()}
    params = state_dict_to_params(sd, shapes, what="controlnet", dtype=np.bool_)  # 1 byte a value: 361 MB
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    assert len(flatten(params)) == len(sd) and n == sum(int(np.prod(v.shape)) for v in sd.values()) > 3.6e8


def test_sdxl_residuals_match_diffusers(tmp_path):
    """An SDXL ControlNet (text-time conditioning: the pooled text embedding and the time ids
    reach the ControlNet too) on SDXL's tiny UNet shape, scale 0.7.  (The whole
    StableDiffusionXLControlNetPipeline was compared once on the dev VM, 2026-11-29: images
    within 6e-7; not kept here for the suite's time budget.)"""
    import jax

    from sd_jax.models import controlnet
    from sd_jax.models.unet import UNetConfig
    cfg = UNetConfig.tiny_sdxl()
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    cn = _torch_controlnet(unet, 3, str(tmp_path / "cn_xl"))
    model, params = controlnet.load(str(tmp_path / "cn_xl"))
    assert model.config.mismatch(cfg, 4) is None and model.config.mismatch(UNetConfig.tiny(cross_attention_dim=64), 4)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 64)).astype(np.float32)
    img = rng.uniform(0, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
    added = {"text_embeds": rng.standard_normal((2, 32)).astype(np.float32),
             "time_ids": np.array([[32, 32, 0, 0, 32, 32], [64, 48, 8, 0, 32, 32]], np.float32)}
    t = np.array([999, 250])
    with torch.no_grad():
        down_ref, mid_ref = cn(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(img), conditioning_scale=0.7,
                               added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}, return_dict=False)
    down, mid = jax.jit(model.apply, static_argnums=(6,))({"params": params}, x, t, ctx, img, 0.7, False, added)
    for ours, theirs in zip(list(down) + [mid], list(down_ref) + [mid_ref]):
        theirs = theirs.numpy().transpose(0, 2, 3, 1)
        assert np.abs(theirs).max() > 0.1 and np.abs(np.asarray(ours) - theirs).max() <= RES_TOL


def test_single_file_layout_equals_folder(tiny, tmp_path):
    """The original layout (``control_model.*``: ``input_hint_block``, ``zero_convs``,
    ``middle_block_out``): written from a diffusers ControlNet by inverting sd-jax's table,
    checked to be what diffusers' own converter reads back to the same weights, then loaded by
    sd-jax: the same config and parameters as the diffusers folder."""
    import jax
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from sd_jax.models import controlnet
    from sd_jax.models.unet import UNetConfig
    from sd_jax.weights.safetensors_io import save_file
    from sd_jax.weights.single_file import _INV_SUBMAPS, _invert, _rename
    _, ref, _, _ = tiny
    torch.manual_seed(4)
    cn = diffusers.ControlNetModel.from_unet(ref.unet)  # the original's 8-conv hint block (indices 0..14)
    cn.save_pretrained(tmp_path / "folder")
    sd = {k: v.numpy() for k, v in cn.state_dict().items()}
    table = _invert(controlnet.single_file_table(3, 1, [True, True, False], list(range(0, 15, 2))))
    original = {"control_model." + _rename(k, table, _INV_SUBMAPS)[0]: v for k, v in sd.items()}
    back = convert_controlnet_checkpoint({k: torch.from_numpy(v) for k, v in original.items()}, dict(cn.config))
    assert sorted(back) == sorted(sd) and all(np.array_equal(back[k].numpy(), sd[k]) for k in sd)
    save_file(original, str(tmp_path / "cn.safetensors"))
    m1, p1 = controlnet.load(str(tmp_path / "cn.safetensors"), base=UNetConfig.tiny())
    m2, p2 = controlnet.load(str(tmp_path / "folder"))
    assert m1.config == m2.config, (m1.config, m2.config)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), p1, p2))
