"""Prompt adherence of a shapes model, read back by the evaluator (sd_jax/data/evaluator.py).

    python benchmarks/bench_adherence.py                       # the shipped model, as below
    python benchmarks/bench_adherence.py --model runs/diff/model --per-combo 4 --guidance 1 2 5 7.5
    python benchmarks/bench_adherence.py --no-diffusers --steps 20 --scheduler dpmpp_2m

One run measures the five things a prompt can ask for, in two engines:

* sd-jax at each ``--guidance`` (default 2, 5 and 7.5) with the sampler and steps that
  ``sd-jax generate`` uses when given none (the CLI's own defaults, read from its parser:
  30 steps of the model's scheduler, guided in the model's recommended window of the steps,
  its ``generation_defaults.json``); ``--steps``/``--scheduler`` and
  ``--guidance-start``/``--guidance-end`` (``--guidance-end 1``: every step) override them;
* diffusers PyTorch (``StableDiffusionPipeline.from_pretrained(model)``, its scheduler from the
  model's config, its default steps and guidance 7.5; ``--no-diffusers`` skips it); with
  ``--diffusers-window`` also guided only in sd-jax's window, through diffusers' documented
  dynamic-CFG callback (row ``diff.+win``).

Prompts are new sentences in the dataset's phrasing ("a [small|large] <colour> <shape> [at the
<position>] on a <colour> background", random background and seed), in two groups: one per
colour-and-shape pair the training set showed (``--per-combo`` each), and the held-out pairs it
never showed together (``shapes.HELD_OUT``, at least 4 each).  A share of the prompts
(``--size-share``, ``--position-share``, drawn independently, default half each) names a size
(small and large alternating) or a position (cycling through all nine).

Reported per engine, guidance and group (fractions right, from ``evaluator.score``):

* colour, shape, background: over all prompts;
* position: over the prompts that name one (chance ~1/9);
* size: over the prompts that name one, the evaluator's size label (larger box side over
  0.30 of the image: between the dataset's small shapes, <= 0.26, and large ones, >= 0.35);
* shape confusion (in the JSON): per shape asked for, what the evaluator read (``none``: no
  shape found);
* area: the mean area of the image's (largest) shape, as a fraction of the image, for the
  "small" and for the "large" prompts, and ``large>small``: the fraction of (large, small)
  prompt pairs of the group whose large-prompt shape has the larger area (ties count half;
  0.5 = size words ignored).  An image with no shape found counts as area 0.

Writes ``adherence.json`` (all of the above, with the settings), ``adherence.png`` (sd-jax
against guidance, diffusers' point at its default), and grids of held-out samples at the CLI's
default guidance (``heldout_samples.png``) and from diffusers (``heldout_samples_diffusers.png``),
prompts in the matching ``.txt``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os

import numpy as np

GROUPS = ("seen combos", "held-out combos")


def prompts_for(combos, per_combo, rng, size_share=0.5, position_share=0.5):
    """New prompts in the dataset's phrasing: ``per_combo`` per (colour, shape) pair.

    Each prompt names a size with probability ``size_share`` (small and large alternating over
    the prompts that do) and a position with probability ``position_share`` (cycling through
    ``shapes.POSITIONS``); the background is a random other colour.
    """
    from sd_jax.data import shapes

    colors, positions, sizes = list(shapes.COLORS), list(shapes.POSITIONS), list(shapes.SIZES)
    out, n_size, n_pos = [], 0, 0
    for color, shape in combos:
        for _ in range(per_combo):
            with_size, with_pos = bool(rng.random() < size_share), bool(rng.random() < position_share)
            obj = {"color": color, "shape": shape, "size": sizes[n_size % len(sizes)],
                   "position": positions[n_pos % len(positions)]}
            n_size, n_pos = n_size + with_size, n_pos + with_pos
            bg = str(rng.choice([c for c in colors if c != color]))
            out.append(shapes.caption_for({"objects": [obj], "background": bg, "template": 0,
                                           "mention_size": with_size, "mention_position": with_pos}))
    return out


def prompt_groups(per_combo, seed, size_share=0.5, position_share=0.5):
    """The benchmark's prompts for one ``seed``: ({group: prompts}, all prompts, their seeds).
    One group of ``per_combo`` prompts per seen colour-and-shape pair, one of at least 4 per
    held-out pair (``shapes.HELD_OUT``); image seeds count up from 1000."""
    from sd_jax.data import shapes

    rng = np.random.default_rng(seed)
    held = [tuple(c) for c in shapes.HELD_OUT]
    seen = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES if (c, s) not in held]
    groups = {GROUPS[0]: prompts_for(seen, per_combo, rng, size_share, position_share),
              GROUPS[1]: prompts_for(held, max(per_combo, 4), rng, size_share, position_share)}
    prompts = [p for ps in groups.values() for p in ps]
    return groups, prompts, list(range(1000, 1000 + len(prompts)))


def summarise(prompts, images) -> dict:
    """Adherence of ``images`` (uint8 [N, H, W, 3]) to ``prompts`` (see the module docstring)."""
    from sd_jax.data import evaluator

    scores = [evaluator.score(p, im) for p, im in zip(prompts, images)]

    def rate(key):
        named = [s[key] for s in scores if s[key] is not None]
        return (float(np.mean(named)) if named else None), len(named)

    r = {"n": len(prompts)}
    for key in ("color", "shape", "background", "position", "size"):
        r[key], n = rate(f"{key}_ok")
        if key in ("position", "size"):
            r[f"n_{key}"] = n
    area = {"small": [], "large": []}
    for s in scores:
        want = s["parsed"]["size"]
        if want is not None:
            objects = s["found"]["objects"]
            area[want].append(objects[0]["area"] if objects else 0.0)
    for k, v in area.items():
        r[f"area_{k}"] = float(np.mean(v)) if v else None
    if area["small"] and area["large"]:
        big, small = np.asarray(area["large"])[:, None], np.asarray(area["small"])[None, :]
        r["large>small"] = float(np.mean((big > small) + 0.5 * (big == small)))
    else:
        r["large>small"] = None
    # What each asked-for shape came out as ("none": no shape found): at high guidance the
    # small models turn squares into four-pointed stars, which read as circles.
    confusion: dict = {}
    for s in scores:
        objects = s["found"]["objects"]
        got = objects[0]["shape"] if objects else "none"
        row = confusion.setdefault(s["parsed"]["shape"], {})
        row[got] = row.get(got, 0) + 1
    r["shape_confusion"] = confusion
    return r


def cli_defaults(steps=None, scheduler=None, model=None):
    """(steps, scheduler, guidance, pipe) as ``sd-jax generate PROMPT`` resolves them."""
    from sd_jax import commands
    from sd_jax.cli import build_parser, default_model
    from sd_jax.pipeline import StableDiffusionPipeline

    argv = ["generate", "x"] + (["--steps", str(steps)] if steps else []) + (
        ["--scheduler", scheduler] if scheduler else [])
    pipe = StableDiffusionPipeline.from_pretrained(model or default_model())
    s = commands.settings(build_parser().parse_args(argv), pipe)
    return s["steps"], s["scheduler"], s["guidance"], pipe


def run_diffusers(model, prompts, seeds, steps=None, guidance_end=None):
    """diffusers PyTorch at its defaults: uint8 images, and the settings it used.  ``guidance_end``:
    stop guiding after that fraction of the steps with diffusers' documented "dynamic
    classifier-free guidance" callback (the prompt's half of the embeddings, guidance off)."""
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline

    ref = TorchPipeline.from_pretrained(model)
    ref.set_progress_bar_config(disable=True)
    params = inspect.signature(type(ref).__call__).parameters
    kwargs = {} if steps is None else {"num_inference_steps": steps}
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if guidance_end is not None and guidance_end < 1.0:
        def stop_guidance(pipe, i, t, kw):
            if i == int(guidance_end * pipe.num_timesteps) - 1:
                kw["prompt_embeds"] = kw["prompt_embeds"].chunk(2)[-1]
                pipe._guidance_scale = 0.0
            return kw
        kwargs.update(callback_on_step_end=stop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with torch.no_grad():
        images = ref(prompt=list(prompts), generator=gens, output_type="np", **kwargs).images
    used = {"scheduler": type(ref.scheduler).__name__,
            "steps": steps or params["num_inference_steps"].default,
            "guidance": params["guidance_scale"].default,
            **({"guidance_end": guidance_end} if "callback_on_step_end" in kwargs else {})}
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8), used


def _row(engine, g, name, r):
    def pct(v):
        return "    -" if v is None else f"{v:5.0%}"

    def area(v):
        return "    -" if v is None else f"{v:.3f}"
    return (f"{engine:>9} {g:>8} {name:>16} {r['n']:>4} | {pct(r['color'])} {pct(r['shape'])} "
            f"{pct(r['background'])} | {pct(r['position'])} ({r['n_position']:>2}) {pct(r['size'])} "
            f"({r['n_size']:>2}) | {area(r['area_small'])} {area(r['area_large'])} {pct(r['large>small'])}")


def _misread(r) -> str:
    """The off-diagonal part of ``r["shape_confusion"]``: "square->circle 14/18, ..."."""
    out = [f"{want}->{got} {n}/{sum(row.values())}" for want, row in sorted(r["shape_confusion"].items())
           for got, n in sorted(row.items()) if got != want]
    return "  shapes misread: " + (", ".join(out) if out else "none")


HEADER = (f"{'engine':>9} {'guidance':>8} {'group':>16} {'n':>4} | colour shape   bg. | position  "
          f"   size      | area S  area L  L>S")


def _grid(images, path, prompts):
    from PIL import Image

    ims = list(images[:16])
    while len(ims) % 8:
        ims.append(np.zeros_like(ims[0]))
    rows = [np.concatenate(ims[i:i + 8], 1) for i in range(0, len(ims), 8)]
    Image.fromarray(np.concatenate(rows, 0)).save(path + ".png")
    with open(path + ".txt", "w") as f:
        f.write("\n".join(prompts[:16]) + "\n")


def _plot(results, guidance, out, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = (("color", "tab:red"), ("shape", "tab:blue"), ("background", "tab:green"),
            ("position", "tab:purple"), ("size", "tab:orange"))
    for name, style in zip(GROUPS, ("-", "--")):
        for key, color in keys:
            ys = [results["sd-jax"][str(g)][name][key] for g in guidance]
            ax.plot(guidance, [np.nan if y is None else y for y in ys], style, color=color, marker="o",
                    label=f"{key} ({name})")
            for g, r in results.get("diffusers", {}).items():
                if r[name][key] is not None:
                    ax.plot([float(g)], [r[name][key]], "s" if name == GROUPS[0] else "D", color=color,
                            markerfacecolor="none", markersize=9)
    ax.set_xlabel("guidance scale (squares/diamonds: diffusers at its defaults)")
    ax.set_ylabel("fraction right")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "adherence.png"), dpi=120)


def main(argv=None):
    from sd_jax.cli import default_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    ap.add_argument("--steps", type=int, default=None, help="sd-jax steps (default: sd-jax generate's)")
    ap.add_argument("--scheduler", default=None, help="sd-jax sampler (default: sd-jax generate's)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[2.0, 5.0, 7.5])
    ap.add_argument("--guidance-start", type=float, default=None,
                    help="sd-jax: guide from this fraction of the steps (default: the model's, as the CLI)")
    ap.add_argument("--guidance-end", type=float, default=None,
                    help="sd-jax: guide only before this fraction of the steps (default: the model's "
                         "generation_defaults.json, as the CLI; 1 = every step)")
    ap.add_argument("--per-combo", type=int, default=2, help="prompts per seen colour-and-shape pair")
    ap.add_argument("--size-share", type=float, default=0.5, help="share of prompts naming a size")
    ap.add_argument("--position-share", type=float, default=0.5, help="share of prompts naming a position")
    ap.add_argument("--no-diffusers", action="store_true", help="skip diffusers PyTorch")
    ap.add_argument("--diffusers-steps", type=int, default=None, help="(default: diffusers' own default)")
    ap.add_argument("--diffusers-window", action="store_true",
                    help="also run diffusers guided only in sd-jax's window (its dynamic-CFG callback)")
    ap.add_argument("--batch-size", type=int, default=None, help="sd-jax images per call (default: all)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "adherence"))
    args = ap.parse_args(argv)

    groups, prompts, seeds = prompt_groups(args.per_combo, args.seed, args.size_share, args.position_share)
    bounds = np.cumsum([0] + [len(ps) for ps in groups.values()])

    def split(images):
        return {name: (groups[name], images[a:b]) for name, a, b in zip(groups, bounds[:-1], bounds[1:])}

    model = args.model or default_model()
    steps, scheduler, cli_guidance, pipe = cli_defaults(args.steps, args.scheduler, model)
    window = {"guidance_start": pipe.generation_defaults.get("guidance_start", 0.0)
              if args.guidance_start is None else args.guidance_start,
              "guidance_end": pipe.generation_defaults.get("guidance_end", 1.0)
              if args.guidance_end is None else args.guidance_end}
    os.makedirs(args.out, exist_ok=True)
    settings = {"model": args.model or "the shipped model (sd_jax.cli.default_model())", "seed": args.seed,
                "per_combo": args.per_combo, "size_share": args.size_share, "position_share": args.position_share,
                "sd-jax": {"steps": steps, "scheduler": scheduler, "guidance": args.guidance, **window}}
    results = {"sd-jax": {}}
    print(HEADER, flush=True)
    # One call for every guidance scale (traced per image: one compilation).
    images = pipe(prompts * len(args.guidance), seed=seeds * len(args.guidance), num_inference_steps=steps,
                  guidance_scale=[g for g in args.guidance for _ in prompts], scheduler=scheduler,
                  **window, output_type="uint8", batch_size=args.batch_size)
    for k, g in enumerate(args.guidance):
        per_g = images[k * len(prompts):(k + 1) * len(prompts)]
        for name, (ps, ims) in split(per_g).items():
            r = results["sd-jax"].setdefault(str(g), {})[name] = summarise(ps, ims)
            print(_row("sd-jax", g, name, r), flush=True)
            print(_misread(r), flush=True)
        if g == (cli_guidance if cli_guidance in args.guidance else args.guidance[-1]):
            _grid(split(per_g)[GROUPS[1]][1], os.path.join(args.out, "heldout_samples"), groups[GROUPS[1]])
    if not args.no_diffusers:
        images, used = run_diffusers(model, prompts, seeds, args.diffusers_steps)
        settings["diffusers"] = used
        for name, (ps, ims) in split(images).items():
            r = results.setdefault("diffusers", {}).setdefault(str(used["guidance"]), {})[name] = summarise(ps, ims)
            print(_row("diffusers", used["guidance"], name, r), flush=True)
            print(_misread(r), flush=True)
        _grid(split(images)[GROUPS[1]][1], os.path.join(args.out, "heldout_samples_diffusers"), groups[GROUPS[1]])
        if args.diffusers_window and window["guidance_end"] < 1.0:   # the same window through its callback
            images, used = run_diffusers(model, prompts, seeds, args.diffusers_steps, window["guidance_end"])
            settings["diffusers_window"] = used
            for name, (ps, ims) in split(images).items():
                r = results.setdefault("diffusers_window", {}).setdefault(str(used["guidance"]), {})[name] = \
                    summarise(ps, ims)
                print(_row("diff.+win", used["guidance"], name, r), flush=True)
                print(_misread(r), flush=True)
    with open(os.path.join(args.out, "adherence.json"), "w") as f:
        json.dump({"settings": settings, "results": results}, f, indent=2)
    _plot(results, args.guidance, args.out, f"prompt adherence; sd-jax: {steps} {scheduler} steps"
          + (f" guided in [{window['guidance_start']:g}, {window['guidance_end']:g})"
             if (window["guidance_start"], window["guidance_end"]) != (0.0, 1.0) else "")
          + (f"; diffusers: {settings['diffusers']['steps']} {settings['diffusers']['scheduler']} steps"
             if "diffusers" in settings else ""))
    return results


if __name__ == "__main__":
    main()
