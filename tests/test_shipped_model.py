"""The small model shipped in checkpoints/ (trained from scratch by `sd-jax train`, see README).

It is a diffusers-format folder: diffusers PyTorch loads it and gives the same image from
the same latents; the prompt conditions what is generated.
"""
import os

import numpy as np
import pytest

from sd_jax.cli import default_model
from tiny_models import nchw

MODEL = default_model()
PROMPTS = ["a red circle on a blue background", "a large white square on a black background",
           "a yellow triangle on a green background", "a blue circle at the top left on a white background",
           "a small black square on a red background", "an orange circle on a purple background",
           "a large green square on a white background", "a purple triangle on a yellow background"]


@pytest.fixture(scope="module")
def pipe():
    assert os.path.isfile(os.path.join(MODEL, "model_index.json")), f"the shipped model is missing at {MODEL}"
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(MODEL)


def test_shipped_model_is_small_diffusers_folder():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MODEL) for f in fs)
    assert total <= 50e6, f"{total / 1e6:.1f} MB"  # issue 18: small enough to ship (<= 50 MB)
    for c in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        assert os.path.isdir(os.path.join(MODEL, c))


def test_generated_image_depends_on_the_prompt(pipe):
    """The same seed with different prompts gives clearly different images (the text conditions
    the UNet)."""
    images = pipe(PROMPTS[:2], seed=[7, 7], num_inference_steps=20, guidance_scale=4.0, scheduler="dpmpp_2m",
                  output_type="uint8")
    assert images.shape == (2, 64, 64, 3)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 20


def test_diffusers_loads_it_and_agrees(pipe):
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline
    ref = TorchPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    size = pipe.default_size
    lat = np.random.RandomState(0).randn(2, size // pipe.models.vae_scale, size // pipe.models.vae_scale,
                                          pipe.latent_channels).astype(np.float32)
    stop = int(pipe.generation_defaults["guidance_end"] * 10)  # guided steps of 10 in the model's window

    def dynamic_cfg(p, i, t, kw):  # diffusers' documented recipe for guidance that stops early
        if i == stop - 1:
            kw["prompt_embeds"] = kw["prompt_embeds"].chunk(2)[-1]
            p._guidance_scale = 0.0
        return kw
    for window, extra in (({"guidance_end": 1.0}, {}),   # diffusers guides every step by default
                          ({}, {"callback_on_step_end": dynamic_cfg,   # sd-jax's default: the model's window
                                "callback_on_step_end_tensor_inputs": ["prompt_embeds"]})):
        with torch.no_grad():
            want = ref(prompt=PROMPTS[:2], latents=nchw(lat), num_inference_steps=10, guidance_scale=4.0,
                       height=size, width=size, output_type="np", **extra).images
        got = pipe(PROMPTS[:2], latents=lat, num_inference_steps=10, guidance_scale=4.0, output_type="uint8",
                   **window)
        want = np.round(np.clip(want, 0, 1) * 255).astype(np.uint8)
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2, window


def test_prompt_adherence_at_guidance_2(pipe):
    """New prompts ("a <colour> <shape> on a <colour> background", one per colour-and-shape
    combination, random backgrounds), read back by the image evaluator: the shape's colour
    must come out right in >= 90% and its class in >= 75% (chance is 1/8 and 1/3; measured 100%
    and 85% on these 20, 98% and 90% on the benchmark's 40 seen-pair prompts at guidance 2,
    benchmarks/README.md: the model is trained for the guidance of 5-8 that tools use by
    default, and is weaker at 2).  The margins allow a borderline image or two to flip on
    another CPU's float rounding."""
    from sd_jax.data import evaluator, shapes
    rng = np.random.default_rng(11)
    held = {tuple(c) for c in shapes.HELD_OUT}
    combos = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in held]
    prompts = [f"a {c} {s} on a {rng.choice([b for b in shapes.COLORS if b != c])} background" for c, s in combos]
    images = pipe(prompts, seed=list(range(500, 500 + len(prompts))), num_inference_steps=20, guidance_scale=2.0,
                  scheduler="dpmpp_2m", output_type="uint8")
    scores = [evaluator.score(p, im) for p, im in zip(prompts, images)]
    colour = np.mean([bool(s["color_ok"]) for s in scores])
    shape = np.mean([bool(s["shape_ok"]) for s in scores])
    assert colour >= 0.90 and shape >= 0.75, f"{len(prompts)} prompts: colour {colour:.0%}, shape {shape:.0%}"


def _new_prompts(seed: int):
    """One new prompt per colour-and-shape pair (the 20 seen in training and the 4 held out),
    each naming a position (cycling through all nine) and a random other background; every
    other one names a size.  Returns (prompts, held_out flags)."""
    from sd_jax.data import shapes
    rng = np.random.default_rng(seed)
    held = {tuple(c) for c in shapes.HELD_OUT}
    combos = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    positions, sizes = list(shapes.POSITIONS), list(shapes.SIZES)
    prompts = []
    for i, (c, s) in enumerate(combos):
        obj = {"color": c, "shape": s, "size": sizes[(i // 2) % 2], "position": positions[i % len(positions)]}
        bg = str(rng.choice([b for b in shapes.COLORS if b != c]))
        prompts.append(shapes.caption_for({"objects": [obj], "background": bg, "template": 0,
                                           "mention_size": i % 2 == 0, "mention_position": True}))
    return prompts, [combo in held for combo in combos]


def _rates(prompts, images, held):
    from sd_jax.data import evaluator
    scores = [evaluator.score(p, im) for p, im in zip(prompts, images)]

    def rate(key, rows):
        named = [bool(scores[i][key]) for i in rows if scores[i][key] is not None]
        return float(np.mean(named))

    seen = [i for i, h in enumerate(held) if not h]
    every = list(range(len(prompts)))
    return {"colour": rate("color_ok", every), "shape": rate("shape_ok", seen),
            "background": rate("background_ok", every), "position": rate("position_ok", every),
            "size": rate("size_ok", every),
            "held-out shape": rate("shape_ok", [i for i, h in enumerate(held) if h])}


# Issue 18's targets at the defaults are colour >= 95%, shape >= 90%, background >= 90%,
# position >= 70%.  The model is trained to ignore the text at the least noisy steps
# (`--text-blind-below 25`) and for the prediction that guidance at 7.5 gives just above them
# (`--guided-loss`), where guidance at 7.5 used to turn its squares into four-pointed stars and
# then circles, so diffusers' defaults (guidance at every step) draw what sd-jax's do.
# sd-jax's defaults include its generation_defaults.json (guidance in the first 85% of the
# steps).  On these 24 new prompts (new backgrounds, positions and seeds) sd-jax's defaults
# give colour, shape on the seen pairs, background, position and size all 100% (held-out pairs
# 4 of 4, not asserted); diffusers at its defaults, on other seeds, colour 100%, shape 90%,
# background, position and size 100% (held-out 4 of 4).  More prompts in benchmarks/README.md.
# The thresholds sit two to four images under the measured figures, so a borderline image may
# flip on another CPU's rounding; the model shipped before the text-blind ones fails the
# diffusers size threshold (83%) and meets its shape one only just (85%).
MIN_AT_DEFAULTS = {"colour": 0.90, "shape": 0.85, "background": 0.90, "position": 0.85, "size": 0.85}
MIN_IN_DIFFUSERS = {"colour": 0.90, "shape": 0.80, "background": 0.90, "position": 0.85, "size": 0.85}


def test_prompt_adherence_at_the_cli_defaults(pipe):
    """``sd-jax generate PROMPT`` as a newcomer runs it (guidance 7.5, 30 steps of the model's
    sampler, read from the CLI's own parser): colour, shape, background, position and size
    words followed, read back by the image evaluator (chance: 1/8, 1/3, 1/7, 1/9, 1/2)."""
    from sd_jax import commands
    from sd_jax.cli import build_parser
    s = commands.settings(build_parser().parse_args(["generate", "x"]), pipe)
    prompts, held = _new_prompts(11)
    assert (s["guidance_start"], s["guidance_end"]) == (0.0, 0.85)  # the model's generation_defaults.json
    images = pipe(prompts, seed=list(range(500, 500 + len(prompts))), num_inference_steps=s["steps"],
                  guidance_scale=s["guidance"], scheduler=s["scheduler"], guidance_start=s["guidance_start"],
                  guidance_end=s["guidance_end"], output_type="uint8")
    r = _rates(prompts, images, held)
    assert all(r[k] >= v for k, v in MIN_AT_DEFAULTS.items()), r


def test_prompt_adherence_in_diffusers_at_its_defaults():
    """The same in diffusers PyTorch (``StableDiffusionPipeline.from_pretrained``, its default 50
    steps of the model's scheduler and guidance 7.5), on other prompts and seeds."""
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline
    ref = TorchPipeline.from_pretrained(MODEL)
    ref.set_progress_bar_config(disable=True)
    prompts, held = _new_prompts(12)
    gens = [torch.Generator().manual_seed(900 + i) for i in range(len(prompts))]
    with torch.no_grad():
        images = ref(prompt=prompts, generator=gens, output_type="np").images
    images = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    r = _rates(prompts, images, held)
    assert all(r[k] >= v for k, v in MIN_IN_DIFFUSERS.items()), r
