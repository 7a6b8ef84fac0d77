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
    p.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "chunked"])


def _add_gen_args(p):
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="seed (batch: of the first row; row i gets seed + i)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--rescale", type=float, default=0.0, help="guidance rescale (0 = off)")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. ddim, euler_a, dpmpp_2m_karras "
                                                     "(default: the model's own)")
    p.add_argument("--size", type=_size_arg, default=None, help="WxH, multiples of 8 (default: the model's)")
    p.add_argument("--clip-skip", type=int, default=None)
    p.add_argument("--no-memory-check", action="store_true",
                   help="skip the check that the size and batch fit in memory (refused before compiling)")
    p.add_argument("--refiner", default=None, help="SDXL refiner folder: the base (--model) denoises until "
                                                   "--refiner-switch, the refiner finishes (text-to-image)")
    p.add_argument("--refiner-switch", type=float, default=None,
                   help="fraction of the noise schedule the base denoises before the refiner (default 0.8)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Stable Diffusion in JAX")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
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
    _add_model_args(g)

    b = sub.add_parser("batch", help="generate every row of a prompt file (.txt, .jsonl, .csv), resumably")
    b.add_argument("prompts", help=".txt (one prompt a line), .jsonl or .csv (columns prompt, negative_prompt, "
                                   "seed, steps, guidance, size, scheduler, name)")
    b.add_argument("--out", required=True, help="output folder (PNGs and manifest.jsonl)")
    _add_gen_args(b)
    b.add_argument("--batch-size", type=int, default=None,
                   help="images per device call over all devices (default: 1 per device; "
                        "rounded up to a multiple of the device count)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--replace", action="store_true",
                   help="--out holds a job with other settings: make it this job's, generating the changed "
                        "images again (by default a changed job is refused)")
    _add_model_args(b)

    c = sub.add_parser("convert", help="convert a model: diffusers folder / single-file .safetensors / "
                                       "sd-jax checkpoint -> sd-jax checkpoint or diffusers folder")
    c.add_argument("source", help="diffusers folder, single-file .safetensors or sd-jax checkpoint")
    c.add_argument("dest", help="folder to write (must not exist, unless --overwrite)")
    c.add_argument("--to", choices=["sd-jax", "diffusers"], default="sd-jax")
    c.add_argument("--overwrite", action="store_true",
                   help="replace DEST if it is a model (sd-jax checkpoint or diffusers folder) or an empty folder")

    sub.add_parser("info", help="devices, backend, default model, compilation cache")

    from sd_jax.train.cli import RECIPES, recipes_help  # no jax import: cheap
    t = sub.add_parser("train", help="train or fine-tune (see README)", epilog=recipes_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", default=None, help=f"one of {', '.join(RECIPES)}")
    t.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    # transformers (the tokenizers) warns "PyTorch was not found" on import, which sd-jax never
    # needs; set before anything imports it.  A user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    from sd_jax import commands
    commands.route_warnings()
    try:
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
