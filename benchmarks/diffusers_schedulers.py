"""Does the model folder's scheduler decide how diffusers at its defaults follows a prompt?

    python benchmarks/diffusers_schedulers.py                      # the shipped model, 8 schedulers
    python benchmarks/diffusers_schedulers.py --model runs/x/model --per-combo 8 --out sweep.json

A model folder names its scheduler (``model_index.json`` and ``scheduler/scheduler_config.json``),
and diffusers' ``StableDiffusionPipeline.from_pretrained`` samples with it at its default steps (50)
and guidance (7.5), guided at every step.  This runs diffusers on copies of the folder that differ
only in the scheduler (the weights are symlinked) on the prompts of ``bench_adherence.py`` (same
``--seed`` and ``--per-combo``, so the same prompts and seeds), and prints the shape read back for
the seen and the held-out colour-and-shape pairs, with what the misread shapes became.
"""
import argparse
import json
import os
import tempfile
import time

import bench_adherence as B

# name -> overrides of the folder's scheduler config ("_class_name": another scheduler class).
VARIANTS = {
    "as shipped": {},
    "sde-dpmsolver++": {"algorithm_type": "sde-dpmsolver++"},
    "final sigma_min": {"final_sigmas_type": "sigma_min"},
    "leading spacing": {"timestep_spacing": "leading"},
    "Euler": {"_class_name": "EulerDiscreteScheduler"},
    "Euler ancestral": {"_class_name": "EulerAncestralDiscreteScheduler"},
    "DDIM": {"_class_name": "DDIMScheduler"},
    "PNDM": {"_class_name": "PNDMScheduler", "skip_prk_steps": True},
}


def folder_with_scheduler(model: str, over: dict, where: str) -> str:
    """A copy of ``model`` (symlinks) whose scheduler config carries ``over``."""
    os.makedirs(os.path.join(where, "scheduler"))
    for e in os.listdir(model):
        if e not in ("scheduler", "model_index.json"):
            os.symlink(os.path.abspath(os.path.join(model, e)), os.path.join(where, e))
    with open(os.path.join(model, "scheduler", "scheduler_config.json")) as f:
        cfg = dict(json.load(f), **over)
    with open(os.path.join(model, "model_index.json")) as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", cfg["_class_name"]]
    for path, d in ((os.path.join(where, "scheduler", "scheduler_config.json"), cfg),
                    (os.path.join(where, "model_index.json"), index)):
        with open(path, "w") as f:
            json.dump(d, f, indent=1)
    return where


def main(argv=None):
    from sd_jax.cli import default_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    ap.add_argument("--per-combo", type=int, default=8)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--only", nargs="+", default=None, choices=sorted(VARIANTS), help="run these variants only")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    model = args.model or default_model()
    groups, prompts, seeds = B.prompt_groups(args.per_combo, args.seed)
    n0 = len(groups[B.GROUPS[0]])
    results = {}
    for name, over in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            images, used = B.run_diffusers(folder_with_scheduler(model, over, os.path.join(tmp, "m")), prompts, seeds)
        r = {g: B.summarise(groups[g], ims) for g, ims in ((B.GROUPS[0], images[:n0]), (B.GROUPS[1], images[n0:]))}
        results[name] = {"scheduler": used["scheduler"], "override": over, "steps": used["steps"],
                         "guidance": used["guidance"], **r}
        print(f"{name:18s} {used['scheduler']:32s} shape seen {r[B.GROUPS[0]]['shape']:4.0%} "
              f"held-out {r[B.GROUPS[1]]['shape']:4.0%}  colour {r[B.GROUPS[0]]['color']:4.0%} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        print("   seen:", B._misread(r[B.GROUPS[0]]), "| held-out:", B._misread(r[B.GROUPS[1]]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model or "the shipped model", "per_combo": args.per_combo, "seed": args.seed,
                       "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
