"""Where does guidance 7.5 turn a shapes model's squares into stars?  (issue 18's diagnosis)

    python benchmarks/probe_guidance.py --model checkpoints/sd-jax-shapes

1. Guidance windows.  The benchmark's new prompts for squares (18) and 16 others, the same
   starting noise, 20 DDIM steps (sd-jax's sampler, trailing spacing), with the
   guidance scale switched between 7.5 and 2 at a timestep: the evaluator's shape count per
   window.  If the squares survive "7.5 at t >= 200, 2 below" but not "2 above, 7.5 below",
   the stars are made at the last, least noisy steps, not where the shape is laid out.  The
   "0 below" rows take the empty-prompt prediction alone at the last steps: what a model
   trained with ``--text-blind-below`` does there whatever the guidance.
2. One guided step on real squares.  Training-set squares, encoded and noised to timestep t:
   the RMS error (latent units) of the predicted clean latent with the caption, with the empty
   prompt, and guided at 7.5 (``uncond + 7.5 (cond - uncond)``), and the RMS of ``cond -
   uncond``.  Guidance multiplies that difference by 6.5; where the image alone decides what is
   there, a perfect model's two predictions are equal.
3. How much latent error the decoder tolerates: training-set squares decoded from their
   latents plus Gaussian noise (RMS in units of the scaled latents), and how many still read as
   squares.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_adherence  # noqa: E402

from sd_jax.data import evaluator, shapes  # noqa: E402
from sd_jax.diffusion.samplers import make_sampler  # noqa: E402
from sd_jax.pipeline import StableDiffusionPipeline  # noqa: E402
from sd_jax.tokenizer import tokenize  # noqa: E402
from sd_jax.train.losses import NoiseSchedule  # noqa: E402

WINDOWS = (("7.5 at every step", lambda t: 7.5), ("2 at every step", lambda t: 2.0),
           ("7.5 at t >= 700, 2 below", lambda t: 7.5 if t >= 700 else 2.0),
           ("7.5 at t >= 400, 2 below", lambda t: 7.5 if t >= 400 else 2.0),
           ("2 at t >= 700, 7.5 below", lambda t: 2.0 if t >= 700 else 7.5),
           ("2 at t >= 400, 7.5 below", lambda t: 2.0 if t >= 400 else 7.5),
           ("7.5 at t >= 200, 2 below", lambda t: 7.5 if t >= 200 else 2.0),
           ("7.5 at t >= 300, 1 below", lambda t: 7.5 if t >= 300 else 1.0),     # sd-jax's window
           ("7.5 at t >= 200, 0 below", lambda t: 7.5 if t >= 200 else 0.0),     # empty prompt alone below:
           ("7.5 at t >= 100, 0 below", lambda t: 7.5 if t >= 100 else 0.0))     # a text-blind model's last steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/sd-jax-shapes")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(a.model)
    m, p, sc = pipe.models, pipe.params, pipe.scheduler_config
    if sc.prediction_type != "epsilon":
        raise SystemExit(f"{a.model} predicts {sc.prediction_type}; this probe is written for epsilon prediction")
    ac = NoiseSchedule(rescale_betas_zero_snr=bool(sc.rescale_betas_zero_snr)).alphas_cumprod()
    sf = m.vae.config.scaling_factor
    side, ch = m.unet.config.sample_size, m.unet.config.in_channels

    def encode(prompts):
        ids = jnp.asarray(tokenize(pipe.tokenizer, prompts, 77))
        return m.text_encoder.apply({"params": p["text_encoder"]}, ids)["prompt_embeds"]

    @jax.jit
    def predict(x, t, ctx):
        return m.unet.apply({"params": p["unet"]}, x, jnp.full((x.shape[0],), t), ctx)

    @jax.jit
    def decode(latents):
        y = m.vae.apply({"params": p["vae"]}, latents / sf, method="decode")
        return jnp.clip((y + 1) * 127.5, 0, 255).astype(jnp.uint8)

    def shape_of(prompt, image):
        found = evaluator.score(prompt, image)["found"]["objects"]
        return found[0]["shape"] if found else None

    # 1. guidance windows
    rng = np.random.default_rng(2026)
    held = [tuple(c) for c in shapes.HELD_OUT]
    seen = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in held]
    prompts = bench_adherence.prompts_for(seen, 2, rng) + bench_adherence.prompts_for(held, 4, rng)
    prompts = [q for q in prompts if "square" in q] + [q for q in prompts if "square" not in q][:16]
    n = len(prompts)
    cond, empty = encode(prompts), encode([""] * n)
    ddim = make_sampler("ddim", sc, a.steps, timestep_spacing="trailing", clip_sample=False)
    noise = jax.random.normal(jax.random.key(5), (n, side, side, ch))
    wanted = [shapes.parse_prompt(q)["objects"][0]["shape"] for q in prompts]
    print(f"model {a.model}; {n} prompts ({wanted.count('square')} squares), {a.steps} DDIM steps")
    print("1. guidance window                shapes right   squares right")
    for name, scale in WINDOWS:
        x, state = noise, ddim.init_state(noise.shape)
        for i, t in enumerate(ddim.timesteps):
            eu, ec = predict(x, int(t), empty), predict(x, int(t), cond)
            x, state = ddim.step(state, eu + scale(t) * (ec - eu), x, i)
        got = [shape_of(q, im) for q, im in zip(prompts, np.asarray(decode(x)))]
        right = sum(g == w for g, w in zip(got, wanted))
        squares = sum(g == w == "square" for g, w in zip(got, wanted))
        print(f"   {name:28s}   {right:3d} / {n}        {squares:3d} / {wanted.count('square')}")

    # 2. one guided step on real squares; 3. the decoder's tolerance
    images, captions = [], []
    i = 0
    while len(images) < 40:
        image, caption, labels = shapes.sample(7, i)
        i += 1
        if labels["shape"] == "square":
            images.append(image)
            captions.append(caption)
    x = jnp.asarray(np.stack(images), jnp.float32) / 127.5 - 1
    mean, _ = m.vae.apply({"params": p["vae"]}, x, method="encode")
    latents = mean * sf
    cond, empty = encode(captions), encode([""] * len(captions))
    z = jax.random.normal(jax.random.key(1), latents.shape)
    print("2. one step on 40 training squares: RMS error of the predicted clean latent")
    print("      t   captioned   empty prompt   guided 7.5   |cond - uncond|")
    rms = lambda d: float(jnp.sqrt(jnp.mean(d ** 2)))  # noqa: E731
    for t in (49, 99, 199, 399):
        xt = np.sqrt(ac[t]) * latents + np.sqrt(1 - ac[t]) * z
        x0 = lambda e: (xt - np.sqrt(1 - ac[t]) * e) / np.sqrt(ac[t])  # noqa: E731
        xc, xu = x0(predict(xt, t, cond)), x0(predict(xt, t, empty))
        print(f"   {t:4d}   {rms(xc - latents):9.4f}   {rms(xu - latents):12.4f}   "
              f"{rms(xu + 7.5 * (xc - xu) - latents):10.4f}   {rms(xc - xu):15.4f}")
    print("3. the decoder: squares still read as squares after latent noise of RMS r")
    for r in (0.0, 0.05, 0.1, 0.2, 0.3):
        noisy = np.asarray(decode(latents + r * jax.random.normal(jax.random.key(0), latents.shape)))
        kept = sum(shape_of(c, im) == "square" for c, im in zip(captions, noisy))
        print(f"   r = {r:4.2f}: {kept} / {len(captions)}")


if __name__ == "__main__":
    main()
