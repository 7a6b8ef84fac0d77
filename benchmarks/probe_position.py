"""Does a shapes model's prediction move with the position words?  (issue 18's diagnosis)

    python benchmarks/probe_position.py --model checkpoints/sd-jax-shapes

At the noisiest timesteps a model can only place the shape from the prompt.  For "a red circle
<position> on a blue background" with four opposite positions, the same 16 pure-noise latents,
this prints the centre of mass (latent pixels, 0-15; 7.5 is the middle) of the predicted clean
latents' deviation from their mean colour, averaged over the 16.  A model that follows position
words moves it (top left: both coordinates small; bottom right: both large); one that ignores
them prints the same centre for every position.

First it prints how far apart the text encoder puts the prompts: the mean |difference| of
the prompt embeddings for opposite positions ("at the top left" vs "at the bottom right") and
for two colours ("red" vs "green" circle).  A UNet can only follow words that change what it
attends to; the shipped model's jointly trained encoder gives positions 16x less than colours.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.pipeline import StableDiffusionPipeline
from sd_jax.tokenizer import tokenize
from sd_jax.train.losses import NoiseSchedule

POSITIONS = ("at the top left", "at the bottom right", "on the left", "on the right")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="checkpoints/sd-jax-shapes")
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 900, 800])
    a = ap.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(a.model)
    m, p, sc = pipe.models, pipe.params, pipe.scheduler_config
    ac = NoiseSchedule(rescale_betas_zero_snr=bool(sc.rescale_betas_zero_snr)).alphas_cumprod()
    side = m.unet.config.sample_size
    x = jax.random.normal(jax.random.key(0), (16, side, side, m.unet.config.in_channels))
    ys, xs = np.mgrid[:side, :side]
    print(f"model {a.model}: {sc.prediction_type}, zero terminal SNR {sc.rescale_betas_zero_snr}")

    def embeds(prompts):
        ids = jnp.asarray(tokenize(pipe.tokenizer, prompts, 77))
        return np.asarray(m.text_encoder.apply({"params": p["text_encoder"]}, ids)["prompt_embeds"])

    e = embeds([f"a {c} circle {pos} on a blue background"
                for c, pos in (("red", "at the top left"), ("red", "at the bottom right"), ("green", "at the top left"))])
    d_pos, d_col = np.abs(e[0] - e[1]).mean(), np.abs(e[0] - e[2]).mean()
    print(f"text embeddings, mean |difference|: top left vs bottom right {d_pos:.4f}; red vs green {d_col:.4f} "
          f"(ratio {d_col / d_pos:.1f})")
    for t in a.timesteps:
        abar = float(ac[t])
        row = []
        for pos in POSITIONS:
            ctx = jnp.broadcast_to(embeds([f"a red circle {pos} on a blue background"]), (16, *e.shape[1:]))
            out = m.unet.apply({"params": p["unet"]}, x, jnp.full((16,), t), ctx)
            if sc.prediction_type == "v_prediction":
                x0 = np.sqrt(abar) * x - np.sqrt(1 - abar) * out
            else:
                x0 = (x - np.sqrt(1 - abar) * out) / max(np.sqrt(abar), 1e-3)
            mean = np.asarray(x0).mean(0)
            dev = np.abs(mean - mean.mean((0, 1))).sum(-1)
            w = dev / dev.sum()
            row.append(f"{pos}: ({(w * xs).sum():.2f}, {(w * ys).sum():.2f})")
        print(f"t={t}: " + "; ".join(row))


if __name__ == "__main__":
    main()
