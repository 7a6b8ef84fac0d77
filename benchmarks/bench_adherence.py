"""Prompt adherence of a shapes model, read back by the evaluator (sd_jax/data/evaluator.py).

    python benchmarks/bench_adherence.py                       # the shipped model, 20 DPM-Solver++ steps
    python benchmarks/bench_adherence.py --model runs/diff/model --per-combo 4 --guidance 1 2 3 5 7.5
    python benchmarks/bench_adherence.py --guidance 2 --positions    # also "at the top left" etc.

Prompts are new sentences ("a <colour> <shape> on a <colour> background", with random
other colours and seeds), in two groups: colour-and-shape combinations the training set
showed, and the held-out combinations it never showed together (``shapes.HELD_OUT``).
Prints, per guidance scale and group, how often the shape colour, the shape class and the
background colour come out right; writes a plot of adherence against guidance scale and a
grid of samples.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def prompts_for(combos, per_combo, rng, colors, positions=None):
    out = []
    for color, shape in combos:
        for _ in range(per_combo):
            bg = rng.choice([c for c in colors if c != color])
            where = ""
            if positions:
                pos = positions[len(out) % len(positions)]
                where = " in the center" if pos == "center" else f" at the {pos}"
            out.append(f"a {color} {shape}{where} on a {bg} background")
    return out


def main(argv=None):
    from sd_jax.cli import default_model
    from sd_jax.data import evaluator, shapes
    from sd_jax.pipeline import StableDiffusionPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="dpmpp_2m")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    ap.add_argument("--per-combo", type=int, default=2, help="prompts per colour-and-shape combination")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--positions", action="store_true",
                    help="add a position word to every prompt (cycling through all nine) and report it")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "adherence"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    colors = list(shapes.COLORS)
    held = [tuple(c) for c in shapes.HELD_OUT]
    seen = [(c, s) for c in colors for s in shapes.SHAPES if (c, s) not in held]
    positions = list(shapes.POSITIONS) if args.positions else None
    groups = {"seen combos": prompts_for(seen, args.per_combo, rng, colors, positions),
              "held-out combos": prompts_for(held, max(args.per_combo, 4), rng, colors, positions)}
    pipe = StableDiffusionPipeline.from_pretrained(args.model or default_model())
    os.makedirs(args.out, exist_ok=True)
    results = {}
    print(f"{'guidance':>8} {'group':>16} {'n':>4} | {'colour':>7} {'shape':>7} {'background':>10}"
          + (f" {'position':>8}" if positions else ""))
    samples = []
    for g in args.guidance:
        for name, prompts in groups.items():
            seeds = list(range(1000, 1000 + len(prompts)))
            images = pipe(prompts, seed=seeds, num_inference_steps=args.steps, guidance_scale=g,
                          scheduler=args.scheduler, output_type="uint8")
            scores = [evaluator.score(p, im) for p, im in zip(prompts, images)]
            rate = lambda k: float(np.mean([bool(s[k]) for s in scores]))  # noqa: E731
            r = {"n": len(prompts), "color": rate("color_ok"), "shape": rate("shape_ok"),
                 "background": rate("background_ok")}
            if positions:
                r["position"] = rate("position_ok")
            results.setdefault(str(g), {})[name] = r
            print(f"{g:>8} {name:>16} {r['n']:>4} | {r['color']:>7.1%} {r['shape']:>7.1%} {r['background']:>10.1%}"
                  + (f" {r['position']:>8.1%}" if positions else ""), flush=True)
            if name == "held-out combos" and g == sorted(args.guidance)[len(args.guidance) // 2]:
                samples = list(zip(prompts, images))
    with open(os.path.join(args.out, "adherence.json"), "w") as f:
        json.dump({"steps": args.steps, "scheduler": args.scheduler, "results": results}, f, indent=2)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        gs = args.guidance
        for name, style in (("seen combos", "-"), ("held-out combos", "--")):
            for key, color in (("color", "tab:red"), ("shape", "tab:blue"), ("background", "tab:green")):
                ax.plot(gs, [results[str(g)][name][key] for g in gs], style, color=color, marker="o",
                        label=f"{key} ({name})")
        ax.set_xlabel("guidance scale")
        ax.set_ylabel("fraction right")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"prompt adherence, {args.steps} {args.scheduler} steps")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "adherence.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")
    if samples:
        from PIL import Image
        ims = [im for _, im in samples[:16]]
        while len(ims) % 8:
            ims.append(np.zeros_like(ims[0]))
        rows = [np.concatenate(ims[i:i + 8], 1) for i in range(0, len(ims), 8)]
        Image.fromarray(np.concatenate(rows, 0)).save(os.path.join(args.out, "heldout_samples.png"))
        with open(os.path.join(args.out, "heldout_samples.txt"), "w") as f:
            f.write("\n".join(p for p, _ in samples[:16]) + "\n")


if __name__ == "__main__":
    main()
