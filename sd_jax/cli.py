"""``sd-jax`` command line: parses arguments and calls library functions, nothing more.

Every error a user can fix ends the command with one line on stderr,
``sd-jax: error: ...``, and exit status 2 (130 when interrupted); a bug still shows
its traceback.  See :func:`sd_jax.commands.describe_error`.
"""
from __future__ import annotations

import argparse
import os
import sys

from sd_jax.commands import DTYPES, default_model  # noqa: F401  (default_model: the CLI's public helper)
from sd_jax.request import parse_size

PROG = "sd-jax"


def _size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _shapes_arg(text: str) -> list[tuple[int, int, int]]:
    """``"512x512:20,1024x1024:30"`` -> [(width, height, steps), ...] (steps default 30)."""
    shapes = []
    for item in text.split(","):
        size, _, steps = item.strip().partition(":")
        try:
            shapes.append((*parse_size(size), int(steps or 30)))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: {e}" if steps.strip().isdigit() or not steps
                                             else f"{item.strip()!r}: steps {steps!r} is not a number") from None
        if shapes[-1][2] < 1:
            raise argparse.ArgumentTypeError(f"{item.strip()!r}: steps must be at least 1")
    return shapes


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``sd-jax: error: ...`` (exit status 2)."""

    def error(self, message):
        sub = self.prog[len(PROG):].strip()
        hint = f" (see '{PROG} {sub + ' ' if sub else ''}--help')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def _add_model_args(p):
    p.add_argument("--model", default=None, help="diffusers folder, sd-jax checkpoint or single-file .safetensors "
                                                 "(default: $SD_JAX_MODEL, else the model in checkpoints/)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype (bf16 on GPU/TPU)")
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "chunked", "pallas", "flash"],
                   help="attention implementation; auto: the Pallas kernel on TPU, cuDNN's fused attention on "
                        "GPU (bf16/fp16), XLA elsewhere; pallas: sd-jax's TPU kernel, flash: JAX's TPU flash "
                        "attention kernels (both on a TPU only)")
    p.add_argument("--no-watermark", action="store_true",
                   help="SDXL: leave out the invisible watermark diffusers puts in SDXL images (on by default)")
    p.add_argument("--unet", default=None, metavar="FILE",
                   help="UNet-only .safetensors replacing the model's UNet weights (e.g. SDXL-Lightning's "
                        "sdxl_lightning_4step_unet.safetensors with SDXL base)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache (default: $SD_JAX_CACHE, else ~/.cache/sd_jax/xla)")


def _add_gen_args(p):
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="seed (batch: of the first row; row i gets seed + i)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale (0 = off)")
    p.add_argument("--guidance-start", type=float, default=None, metavar="F",
                   help="guide from this fraction of the steps on (default: the model's generation_defaults.json, "
                        "else 0)")
    p.add_argument("--guidance-end", type=float, default=None, metavar="F",
                   help="guide only before this fraction of the steps (default: the model's "
                        "generation_defaults.json, else 1; 0.8 leaves the least noisy fifth unguided, where "
                        "guidance exaggerates a small model's errors)")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. ddim, euler_a, dpmpp_2m_karras "
                                                     "(default: the model's own)")
    p.add_argument("--size", type=_size_arg, default=None, help="WxH, multiples of 8 (default: the model's)")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--no-memory-check", action="store_true",
                   help="skip the check that the size and batch fit in memory (refused before compiling)")
    p.add_argument("--embeddings-dir", default=None,
                   help="folder of textual-inversion embeddings (.safetensors; A1111, diffusers, SDXL), used in "
                        "prompts by file name or token")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read .pt/.bin embeddings (pickles: torch.load(weights_only=True))")
    p.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto",
                   help="decode/encode the image in overlapping tiles (auto: when the VAE would not fit)")
    p.add_argument("--no-safety-checker", action="store_true",
                   help="do not run the model's safety checker (on by default when the model has one)")
    p.add_argument("--safety-policy", choices=["black", "blur", "keep"], default="black",
                   help="what the safety checker does to a flagged image (keep: only record the flag)")
    p.add_argument("--refiner", default=None, help="SDXL refiner folder: the base (--model) denoises until "
                                                   "--refiner-switch, the refiner finishes (text-to-image)")
    p.add_argument("--refiner-switch", type=float, default=None,
                   help="fraction of the noise schedule the base denoises before the refiner (default 0.8)")
    p.add_argument("--timestep-spacing", choices=["leading", "trailing", "linspace"], default=None,
                   help="the sampler's timestep spacing, replacing the model's scheduler config's "
                        "(SDXL-Turbo/-Lightning: trailing)")


def _add_lora_args(p):
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="merge a LoRA (.safetensors: kohya, diffusers/PEFT, LyCORIS LoHa/LoKr) at WEIGHT "
                        "(default 1); repeatable; FILE may be a name in --lora-dir")
    p.add_argument("--lora-dir", default=None, help="folder of LoRAs that --lora names and the prompt's <lora:name:weight> tags "
                        "are looked up in (and its sub-folders)")
    p.add_argument("--lora-partial", action="store_true",
                   help="load a LoRA even if some of its keys match no layer of the model (they are ignored)")


def build_parser(generate_defaults: dict | None = None) -> argparse.ArgumentParser:
    """``generate_defaults``: generate's defaults replaced (``--from-png``: the PNG's settings)."""
    parser = Parser(prog=PROG, description="Stable Diffusion in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt", nargs="?", default=None, help="the prompt (default with --from-png: the PNG's)")
    _add_gen_args(g)
    g.add_argument("--num", type=int, default=1, help="number of images (seeds seed, seed+1, ...)")
    g.add_argument("--init-image", default=None, help="img2img: the starting image")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img/inpaint: how far to move from the image (default 0.8)")
    g.add_argument("--mask", default=None, help="inpainting: mask image, white = repaint (needs --init-image)")
    g.add_argument("-o", "--output", default="out.png", help="PNG path (with --num > 1: NAME-0.png, NAME-1.png, ...)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per device call over all devices (default: 1 per device); --num runs in "
                        "batches of this size, each written as it is done")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--prompt-syntax", choices=["a1111", "plain"], default="a1111",
                   help="a1111 (default): (word:1.2), [word], BREAK, prompts of any length in 75-token chunks; "
                        "plain: the text as diffusers reads it, truncated at 77 tokens")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a diffusers ControlNetModel folder (repeatable; the Nth steers with the Nth --control)")
    g.add_argument("--control", action="append", default=[], metavar="KIND:IMAGE[:SCALE]",
                   help="control image for the matching --controlnet: canny (edges computed, needs "
                        "sd-jax[canny]) or pose/depth/normal/scribble/tile/... (used as given); SCALE default 1")
    g.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode (as diffusers)")
    g.add_argument("--from-png", default=None, metavar="PNG",
                   help="take the prompt and settings from a PNG's A1111 parameters (sd-jax's or A1111's: "
                        "steps, sampler, CFG scale, seed, size, clip skip, refiner switch, ...); options given win")
    _add_model_args(g)
    _add_lora_args(g)
    if generate_defaults:
        g.set_defaults(**generate_defaults)

    b = sub.add_parser("batch", help="generate every row of a prompt file (.txt, .jsonl, .csv), resumably")
    b.add_argument("prompts", help=".txt (one prompt a line), .jsonl or .csv (columns prompt, negative_prompt, "
                                   "seed, steps, guidance, size, scheduler, name, control)")
    b.add_argument("--out", required=True, help="output folder (PNGs and manifest.jsonl)")
    _add_gen_args(b)
    b.add_argument("--batch-size", type=int, default=None,
                   help="images per device call over all devices (default: 1 per device; "
                        "rounded up to a multiple of the device count)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--replace", action="store_true",
                   help="--out holds a job with other settings: make it this job's, generating the changed "
                        "images again (by default a changed job is refused)")
    b.add_argument("--score-with", default=None, metavar="CLIP",
                   help="after the job, CLIP-score every image with this CLIPModel folder: OUT/clip_scores.jsonl")
    b.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet (repeatable) steering the rows with a control column: KIND:IMAGE[:SCALE] "
                        "entries, one per --controlnet, separated by ';' (image paths relative to the prompt file)")
    b.add_argument("--guess-mode", action="store_true", help="ControlNet guess mode for the rows with a control")
    _add_model_args(b)
    _add_lora_args(b)

    c = sub.add_parser("convert", help="convert a model: diffusers folder / single-file .safetensors / "
                                       "sd-jax checkpoint -> sd-jax checkpoint, diffusers folder or single file")
    c.add_argument("source", help="diffusers folder, single-file .safetensors or sd-jax checkpoint")
    c.add_argument("dest", help="folder to write (must not exist, unless --overwrite)")
    c.add_argument("--to", choices=["sd-jax", "diffusers", "single-file"], default="sd-jax",
                   help="single-file: one original-layout .safetensors (CompVis; SGM for SDXL), DEST ending in .safetensors")
    c.add_argument("--overwrite", action="store_true",
                   help="replace DEST if it is a model (sd-jax checkpoint or diffusers folder) or an empty folder")
    c.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet (diffusers folder or original .safetensors) to save with the model "
                        "(repeatable; DEST is then a ControlNet pipeline: controlnet/, controlnet_1/, ...)")

    i = sub.add_parser("info", help="devices, backend, default model, compilation cache; with --lora: "
                                    "which layers of --model each LoRA key changes")
    i.add_argument("--model", default=None, help="the model --lora is matched against (default: as generate)")
    _add_lora_args(i)

    s = sub.add_parser("serve", help="HTTP server: AUTOMATIC1111 API, native API, web page (see README)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--precompile", default=None, help="shapes to compile before /health says ready, "
                                                      "WxH:STEPS,... (e.g. 512x512:20,768x768:30)")
    s.add_argument("--max-batch", type=int, default=8, help="images per device call (over all devices)")
    s.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a request waits for others to batch with")
    s.add_argument("--queue-size", type=int, default=64, help="images queued beyond which requests get HTTP 429")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (then HTTP 504)")
    s.add_argument("--max-side", type=int, default=2048, help="largest width or height a request may ask for")
    s.add_argument("--max-steps", type=int, default=150, help="most steps a request may ask for")
    s.add_argument("--max-images", type=int, default=16, help="most images per request")
    s.add_argument("--max-body-mb", type=int, default=32, help="largest request body (uploaded images), MiB")
    s.add_argument("--api-auth", default=None, help="USER:PASSWORD: HTTP Basic authentication (as A1111)")
    s.add_argument("--api-token", default=None, help="a bearer token clients must send")
    s.add_argument("--models-dir", default=None, help="folder of models /sdapi/v1/options can switch among")
    s.add_argument("--no-memory-check", action="store_true", help="skip the check that a size fits in memory")
    s.add_argument("--lora-dir", default=None, help="folder of LoRAs that prompts' <lora:name:weight> tags apply "
                                                    "(requests with the same LoRAs batch together); /sdapi/v1/loras")
    s.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings to load "
                                                          "(used in prompts by name; /sdapi/v1/embeddings)")
    s.add_argument("--allow-pickle", action="store_true", help="also read .pt/.bin embeddings "
                                                               "(torch.load(weights_only=True))")
    s.add_argument("--controlnet-dir", default=None, help="folder of ControlNets (diffusers folders, .safetensors) "
                                                          "to load; requests name them (A1111 alwayson_scripts)")
    s.add_argument("--live-preview", action="store_true", help="per-step progress and a cheap preview image in "
                                                               "/sdapi/v1/progress (a host callback per step)")

    pc = sub.add_parser("precompile", help="compile generation programs into the persistent compilation cache, "
                                           "so later generate/batch processes start without compiling")
    pc.add_argument("--shapes", type=_shapes_arg, required=True,
                    help="WxH:STEPS,... e.g. 512x512:20,1024x1024:30 (steps default 30)")
    pc.add_argument("--batch-size", type=int, default=None,
                    help="the --batch-size generate/batch will use (default: 1 per device); every call size "
                         "up to it is compiled")
    pc.add_argument("--scheduler", default=None, help="as generate's (default: the model's own)")
    pc.add_argument("--guidance", type=float, default=None, help="as generate's: <= 1 compiles the unguided program")
    pc.add_argument("--clip-skip", type=int, default=None)
    pc.add_argument("--timestep-spacing", choices=["leading", "trailing", "linspace"], default=None,
                    help="as generate's")
    pc.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto")
    pc.add_argument("--no-memory-check", action="store_true")
    _add_model_args(pc)

    from sd_jax.train.cli import RECIPES, recipes_help  # no jax import: cheap
    t = sub.add_parser("train", help="train or fine-tune (see README)", epilog=recipes_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", default=None, help=f"one of {', '.join(RECIPES)}")
    t.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    sc = sub.add_parser("score", help="CLIP score of each image in a folder against its prompt")
    sc.add_argument("folder", help="folder of PNGs with a manifest.jsonl (sd-jax batch) or PNG metadata")
    sc.add_argument("--clip", required=True, help="transformers CLIPModel folder (e.g. clip-vit-large-patch14)")
    sc.add_argument("--out", default=None, help="write the scores to a .csv or .jsonl file")
    sc.add_argument("--batch-size", type=int, default=8, help="images per device call")
    return parser


def main(argv=None) -> int:
    # transformers (the tokenizers) warns "PyTorch was not found" on import, which sd-jax never
    # needs; set before anything imports it.  A user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    from sd_jax import commands
    commands.route_warnings()
    try:
        if getattr(args, "from_png", None):  # the PNG's settings become the defaults: the options given win
            args = build_parser(commands.png_defaults(args)).parse_args(argv)
        return getattr(commands, args.command)(args) or 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, no traceback: every error a user can fix says what to do
        msg = commands.describe_error(e, args.command)
        if msg is None:
            raise
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
