"""``sd-jax train RECIPE [options]``: the training recipes.

* ``vae``: train the small VAE (64x64 -> 16x16x4) on the synthetic shapes;
* ``diffusion``: train the text encoder + UNet from scratch on the shapes, with a
  trained VAE (``--vae``) frozen;
* ``finetune``: fine-tune a diffusers-format model (``--model``) on a folder of images
  with captions (``--data``);
* ``lora``: train a LoRA on a model (``--model``) and such a folder (``--data``), written
  in diffusers/PEFT and kohya formats to ``--out``/lora/ (:mod:`sd_jax.train.lora`).

Every run writes to ``--out`` (checkpoints, ``loss.jsonl``, ``loss.png``, the exported
model) and resumes from there when started again with the same options (after a crash,
a kill or Ctrl-C, which saves a checkpoint first).  The small shapes model (23 MB) with
the defaults of ``RECIPES``::

    sd-jax train vae --out runs/vae                              # 2000 steps of 8 images
    sd-jax train diffusion --out runs/diffusion --vae runs/vae   # 3000 steps of 32
    sd-jax generate "a red circle at the top left" --model runs/diffusion/model

On two (busy) CPU cores these ran at 1.1 and 0.33 steps/s; about 10 + 45 minutes on
two idle cores (estimated from their FLOPs).
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["RECIPES", "RECIPE_HELP", "build_parser", "config_from_args", "recipes_help", "run"]

# Defaults per recipe (vae and diffusion: the small shapes model, see the module docstring).
RECIPES: dict[str, dict] = {
    "vae": dict(steps=2000, batch_size=8, lr=1e-3, warmup=100, ema=0.0, save_every=250, keep=2,
                weight_decay=0.0),
    "diffusion": dict(steps=3000, batch_size=32, lr=5e-4, warmup=200, ema=0.999, save_every=250, keep=2,
                      caption_dropout=0.1, snr_gamma=5.0, weight_decay=1e-2),
    "finetune": dict(steps=1000, batch_size=4, lr=1e-5, warmup=50, ema=0.0, save_every=250, keep=2,
                     caption_dropout=0.1, snr_gamma=None, weight_decay=1e-2),
    "lora": dict(steps=1000, batch_size=4, lr=1e-4, warmup=50, ema=0.0, save_every=250, keep=2,
                 caption_dropout=0.1, snr_gamma=None, weight_decay=1e-2),
}


# One line per recipe, for ``sd-jax train --help`` and each recipe's own --help.
RECIPE_HELP: dict[str, str] = {
    "vae": "train the small VAE on the synthetic shapes (or --data)",
    "diffusion": "train a text encoder + UNet from scratch (shapes), with a trained VAE frozen",
    "finetune": "fine-tune a diffusers-format model on a folder of captioned images",
    "lora": "train a LoRA (diffusers/PEFT and kohya files) on a model and a folder of captioned images",
}


def recipes_help() -> str:
    """The recipes, one a line (the ``sd-jax train --help`` epilog)."""
    width = max(map(len, RECIPE_HELP))
    lines = [f"  {name:<{width}}  {what}" for name, what in RECIPE_HELP.items()]
    return "recipes:\n" + "\n".join(lines) + "\n\nsd-jax train RECIPE --help lists a recipe's options."


class _Parser(argparse.ArgumentParser):
    """Argument errors become one-line ValueErrors (the top-level CLI prints them)."""

    def error(self, message):
        raise ValueError(f"{self.prog}: {message}")


def _components(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError("expected components or patterns, e.g. unet,text_encoder")
    return parts


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _size(text: str) -> int:
    v = _positive_int(text)
    if v % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8, got {v}")
    return v


def build_parser(recipe: str) -> argparse.ArgumentParser:
    d = RECIPES[recipe]
    p = _Parser(prog=f"sd-jax train {recipe}",
                description=RECIPE_HELP[recipe] + "; resumes from --out if it holds a run.")
    p.add_argument("--out", default=os.path.join("runs", recipe),
                   help="run folder: checkpoints, loss.jsonl, loss.png, exported model (default %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=d["steps"], help="batches to train on (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d["batch_size"],
                   help="global batch, split over the devices (default %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=d["warmup"], help="linear warm-up batches (default %(default)s)")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--clip-norm", type=float, default=1.0, help="global-norm gradient clipping (0 = off)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="batches per optimizer update")
    p.add_argument("--ema", type=float, default=d["ema"],
                   help="EMA decay of the weights (0 = off; default %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="compute dtype; bf16 keeps float32 parameters and optimizer state")
    p.add_argument("--remat", action="store_true", help="recompute activations in the backward pass (less memory)")
    p.add_argument("--save-every", type=_positive_int, default=d["save_every"], help="checkpoint interval in steps")
    p.add_argument("--keep", type=_positive_int, default=d["keep"], help="checkpoints to keep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=None, help="image side in pixels (default: 64, or the model's)")
    p.add_argument("--data", default=None,
                   help="folder of images with captions (.txt files or metadata.jsonl)"
                        + ("" if recipe in ("finetune", "lora") else "; default: the synthetic shapes"))
    p.add_argument("--skip-bad-images", action="store_true",
                   help="train without the --data images that cannot be read (their number is reported)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (swapping left/right in captions)")
    p.add_argument("--max-shapes", type=int, choices=[1, 2], default=1, help="shapes per synthetic image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard-params", action="store_true",
                   help="split parameters and optimizer state over the devices (fully-sharded data parallel: "
                        "each holds 1/N; for models too big to replicate)")
    if recipe == "vae":
        p.add_argument("--model", default=None, help="start from this VAE (run folder or vae/ folder)")
        p.add_argument("--widths", default=None,
                       help="VAE block widths, e.g. 32,64,64 (downscale 2**(levels-1); default 16,32,64)")
        p.add_argument("--groups", type=int, default=None, help="GroupNorm groups (must divide every width)")
        p.add_argument("--kl-weight", type=float, default=1e-6)
        p.add_argument("--recon", choices=["l1", "l2"], default="l1")
        p.add_argument("--edge-weight", type=float, default=1.0, help="weight of the image-gradient (edge) loss")
        p.add_argument("--decoder-only", action="store_true",
                       help="train only the decoder of --model: its encoder, and so the latent space a UNet was "
                            "trained on, stay as they are")
        p.add_argument("--latent-noise", type=float, default=0.0, metavar="SIGMA",
                       help="decode latents plus Gaussian noise (standard deviation up to SIGMA times the "
                            "latents') into the clean image, so the decoder tolerates a diffusion model's "
                            "slightly wrong latents (0 = off)")
    else:
        p.add_argument("--vae", default=None, help="a trained VAE (run folder of `train vae`, or a vae/ folder)"
                       + ("" if recipe == "diffusion" else " to use instead of the model's"))
        if recipe in ("finetune", "lora"):
            p.add_argument("--model", required=True,
                           help="the model to fine-tune (diffusers folder, sd-jax checkpoint or single-file .safetensors)")
        else:
            p.add_argument("--model", default=None,
                           help="continue training this model (e.g. an earlier run's model/) on the shapes data")
        if recipe == "lora":
            _lora_arguments(p)
        else:
            p.add_argument("--train", type=_components, default=None,
                           help="components or regexes over parameter paths to train, comma-separated "
                                f"(default: {'unet,text_encoder' if recipe == 'diffusion' else 'unet'})")
        p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                       help="default: epsilon, or the model's when fine-tuning")
        if recipe != "lora":
            p.add_argument("--zero-terminal-snr", action="store_true", default=None,
                           help="rescale the noise schedule so its last timestep is pure noise (Lin et al. "
                                "2023; needs --prediction-type v_prediction; default: the model's)")
        p.add_argument("--snr-gamma", type=float, default=d["snr_gamma"],
                       help="min-SNR-gamma loss weighting (0 = off; default %(default)s)")
        if recipe == "diffusion":
            p.add_argument("--pretrain-text-encoder", type=int, default=0, metavar="STEPS",
                           help="from scratch: first teach the new text encoder to read the captions' labels "
                                "for STEPS batches, so every word (position words too) reaches the UNet "
                                "(0 = off; 1000 take about 4 minutes on two CPU cores)")
            p.add_argument("--unet-widths", default=None, metavar="W1,W2,W3",
                           help="from scratch: the UNet's block widths, multiples of 16 (default 32,64,128)")
            p.add_argument("--unet-layers", type=int, default=None, metavar="N",
                           help="from scratch: ResNets per UNet level (default 1)")
        p.add_argument("--caption-dropout", type=float, default=d["caption_dropout"],
                       help="probability of training on the empty prompt (for guidance)")
        if recipe != "lora":
            p.add_argument("--low-noise-consistency", type=float, default=0.0, metavar="WEIGHT",
                           help="also teach the empty-prompt prediction to match the captioned one at low noise "
                                "(below --consistency-below), where the image alone decides, so guidance there "
                                "is a no-op instead of exaggerating the model's errors (0 = off)")
            p.add_argument("--consistency-below", type=int, default=200, metavar="T",
                           help="timestep under which --low-noise-consistency applies (default %(default)s)")
            p.add_argument("--guided-loss", type=float, default=0.0, metavar="WEIGHT",
                           help="also train, at low noise (below --guided-below), the prediction that "
                                "classifier-free guidance at --guided-scale makes, so tools that guide every "
                                "step draw what the model draws (0 = off)")
            p.add_argument("--guided-scale", type=float, default=7.5, metavar="G",
                           help="guidance scale --guided-loss trains for (default %(default)s, diffusers' default)")
            p.add_argument("--guided-below", type=int, default=200, metavar="T",
                           help="timestep under which --guided-loss applies (default %(default)s)")
            p.add_argument("--text-blind-below", type=int, default=0, metavar="T",
                           help="at timesteps below T, train on another image's caption, so the model ignores "
                                "the text at the last, least noisy steps and guidance there (every step, in "
                                "most tools) changes nothing (0 = off)")
    return p


def _lora_arguments(p: argparse.ArgumentParser) -> None:
    from sd_jax.train.lora import BASE_DTYPES, TARGETS
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha; the scale is alpha/rank (default: the rank)")
    p.add_argument("--targets", default="attn",
                   help=f"layers to adapt, comma-separated from {', '.join(TARGETS)} (te: the text encoder(s); "
                        f"conv: LoCon; default %(default)s)")
    p.add_argument("--base-dtype", choices=list(BASE_DTYPES), default="fp32",
                   help="how the frozen base model is stored (bf16: half the memory; default %(default)s)")


def _model_size(path: str) -> int:
    """Image side a model was trained at: UNet sample_size x VAE downscale factor."""
    from sd_jax.weights.loader import read_configs
    try:
        configs = read_configs(path)
        unet, vae = configs["unet"], configs["vae"]
        sample = unet.get("sample_size") or 64
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    except (OSError, KeyError, ValueError, TypeError):   # (CheckpointError is a ValueError)
        return 512


def config_from_args(recipe: str | None, argv) -> object:
    """The run config a command line describes (ValueError for bad arguments)."""
    if recipe not in RECIPES:
        what = "give a recipe" if recipe is None else f"unknown recipe {recipe!r}"
        raise ValueError(f"{what}: sd-jax train {{{','.join(RECIPES)}}} [options] (--help for the options)")
    a = build_parser(recipe).parse_args(list(argv or []))
    common = dict(out=a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed, lr=a.lr, warmup=a.warmup,
                  schedule=a.schedule, weight_decay=a.weight_decay, clip_norm=a.clip_norm or None,
                  grad_accum=a.grad_accum, ema=a.ema, dtype=a.dtype, remat=a.remat, save_every=a.save_every,
                  keep=a.keep, data=a.data, skip_bad_images=a.skip_bad_images, random_flip=a.flip,
                  max_shapes=a.max_shapes,
                  progress=not a.no_progress, shard_params=a.shard_params)
    if recipe == "vae":
        from sd_jax.train.vae import VAETrainConfig
        if a.remat:
            raise ValueError("--remat applies to the UNet; the VAE recipe does not support it")
        vae_config = None
        if a.widths or a.groups:
            from sd_jax.train.vae import small_vae_config
            kw = {}
            if a.widths:
                try:
                    kw["block_out_channels"] = tuple(int(w) for w in a.widths.split(","))
                except ValueError:
                    raise ValueError(f"--widths {a.widths!r} must be comma-separated integers, e.g. 32,64,64") from None
            if a.groups:
                kw["norm_num_groups"] = a.groups
            if any(w % (a.groups or 8) for w in kw.get("block_out_channels", ())):
                raise ValueError("every --widths entry must be a multiple of --groups")
            vae_config = small_vae_config(**kw)
        return VAETrainConfig(**common, size=a.size or 64, model=a.model, kl_weight=a.kl_weight, recon=a.recon,
                              edge_weight=a.edge_weight, vae_config=vae_config, decoder_only=a.decoder_only,
                              latent_noise=a.latent_noise)
    from sd_jax.train.loop import TrainConfig
    model = getattr(a, "model", None)
    if recipe == "diffusion" and a.vae is None and model is None:
        raise ValueError("the diffusion recipe needs a trained VAE: --vae DIR (train one with `sd-jax train vae`)")
    if recipe in ("finetune", "lora"):
        if a.data is None:
            raise ValueError("fine-tuning needs --data DIR (images with .txt captions or a metadata.jsonl)")
        if not os.path.exists(model):
            raise ValueError(f"--model {model!r} not found")
    size = a.size or (_model_size(model) if model else 64)
    if recipe == "lora":
        from sd_jax.train.lora import LoraTrainConfig
        return LoraTrainConfig(**common, size=size, model=model, vae=a.vae, prediction_type=a.prediction_type,
                               snr_gamma=a.snr_gamma or None, caption_dropout=a.caption_dropout, rank=a.rank,
                               alpha=a.alpha, targets=tuple(t.strip() for t in a.targets.split(",") if t.strip()),
                               base_dtype=a.base_dtype)
    widths = getattr(a, "unet_widths", None)
    if widths is not None:
        try:
            widths = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise ValueError(f"--unet-widths {widths!r} must be comma-separated integers, e.g. 64,64,128") from None
    return TrainConfig(**common, size=size, model=model, vae=a.vae, train=a.train, unet_widths=widths,
                       unet_layers=getattr(a, "unet_layers", None),
                       prediction_type=a.prediction_type, snr_gamma=a.snr_gamma or None,
                       caption_dropout=a.caption_dropout, zero_terminal_snr=a.zero_terminal_snr,
                       text_encoder_pretrain=getattr(a, "pretrain_text_encoder", 0),
                       low_noise_consistency=a.low_noise_consistency, consistency_below=a.consistency_below,
                       guided_loss=a.guided_loss, guided_scale=a.guided_scale, guided_below=a.guided_below,
                       text_blind_below=a.text_blind_below)


def run(recipe: str | None, argv) -> int:
    """``sd-jax train RECIPE ARGV...``: train, print where the result went, return 0."""
    config = config_from_args(recipe, argv)
    from sd_jax.train.loop import TrainingInterrupted, check_shard_params
    check_shard_params(config)
    try:
        if recipe == "vae":
            from sd_jax.train.vae import train_vae
            result = train_vae(config)
        elif recipe == "lora":
            from sd_jax.train.lora import train_lora
            result = train_lora(config)
        else:
            from sd_jax.train.loop import train
            result = train(config)
    except TrainingInterrupted:  # the run said where it stopped, in one line
        return 130
    last = result.log[-1]["loss"] if result.log else float("nan")
    where = f"; {'LoRA' if recipe == 'lora' else 'model'}: {result.export_dir}" if result.export_dir else ""
    print(f"{recipe}: {result.step} steps, last loss {last:.4f}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:]))
