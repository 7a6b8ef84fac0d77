"""Train the shapes model for a fixed wall-clock budget (for a lent accelerator's lease).

    python benchmarks/train_shapes_timed.py --budget 270 --out runs/gpu -- \
        --model checkpoints/sd-jax-shapes --train unet,text_encoder --batch-size 64 --warmup 100

Arguments after ``--`` are ``sd-jax train diffusion`` options (all but ``--out`` and
``--steps``).  A probe run of ``--probe`` steps (in a scratch folder, not exported)
measures the steady-state steps/s with those options; the real run then gets as many
steps as fit in ``--budget`` seconds, so its learning-rate schedule ends where the
time does (``--pretrain-text-encoder`` batches come on top of the budget: about 4.5 min
for 1,000 on two CPU cores).  Prints the probe's rate, the chosen steps, and the run's result.
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, required=True, help="seconds of training for the real run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", type=int, default=120, help="steps of the probe run")
    args = ap.parse_args(own)

    from sd_jax.train.cli import config_from_args
    from sd_jax.train.loop import train

    scratch = tempfile.mkdtemp(prefix="sdjax-probe-")
    probe = config_from_args("diffusion", rest + ["--out", scratch, "--steps", "1000000", "--no-progress"])
    # The probe measures diffusion steps only: the text encoder's pre-training (if asked for)
    # runs once, in the real run, and its time is not part of --budget.
    probe = dataclasses.replace(probe, stop_after=args.probe, export=False, save_every=10**9,
                                text_encoder_pretrain=0)
    t = time.time()
    res = train(probe)
    shutil.rmtree(scratch, ignore_errors=True)
    rates = [r["steps_per_s"] for r in res.log[len(res.log) // 2:] if r["steps_per_s"] > 0]
    rate = statistics.median(rates)
    steps = max(1, int(rate * args.budget))
    print(f"probe: {args.probe} steps in {time.time() - t:.1f}s (compile included), {rate:.2f} steps/s steady "
          f"-> {steps} steps for {args.budget:.0f}s", flush=True)
    config = config_from_args("diffusion", rest + ["--out", args.out, "--steps", str(steps), "--no-progress"])
    t = time.time()
    res = train(config)
    log = res.log
    tail = statistics.mean(r["loss"] for r in log[-100:]) if log else float("nan")
    print(f"trained {res.step} steps in {time.time() - t:.1f}s; mean loss of the last 100 steps {tail:.4f}; "
          f"model: {res.export_dir}", flush=True)


if __name__ == "__main__":
    main()
