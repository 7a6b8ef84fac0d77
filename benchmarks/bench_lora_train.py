"""LoRA training vs full fine-tuning of the UNet: steps/s and peak memory of the compiled step.

    python benchmarks/bench_lora_train.py                        # SD 1.5 widths, 64x64 latents, batch 1
    python benchmarks/bench_lora_train.py --widths 64,128 --layers 1 --te-layers 2 --latent 16 --steps 3

Both runs use the same model (a UNet of SD 1.5's layout at ``--widths``, the SD 1.5 text
encoder with ``--te-layers`` layers; random weights), the same loss
(:class:`sd_jax.train.losses.DiffusionLoss` on latents given directly, so the frozen VAE is
not part of either), the same AdamW and the same compiled train step of
:mod:`sd_jax.train.step`:

* full fine-tuning: the UNet trained (``trainable=("unet",)``), the text encoder frozen
  (as ``sd-jax train finetune`` does by default);
* LoRA: :func:`sd_jax.train.lora` 's adapters of ``--rank`` on ``--targets`` (default: the
  attention projections), the base frozen outside the optimizer (stored in ``--base-dtype``).

Peak memory is XLA's ``memory_analysis()`` of the compiled step: arguments + outputs -
aliased (donated) buffers + temporaries, i.e. what the device holds while the step runs.
Prints one JSON line per run and one with the ratios.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import sharding
from sd_jax.lora.targets import TargetTable
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.models.policy import Policy
from sd_jax.train import optim, step
from sd_jax.train.losses import DiffusionLoss
from sd_jax.train.lora import BASE_DTYPES, TARGETS, LoraLoss, init_lora, lora_shapes, select_targets


def build(args):
    widths = tuple(int(w) for w in args.widths.split(","))
    n = len(widths)
    ucfg = unet_lib.UNetConfig(
        sample_size=args.latent, block_out_channels=widths, layers_per_block=args.layers,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        norm_num_groups=min(32, widths[0] // 2))
    tcfg = clip_lib.CLIPTextConfig.sd15(num_hidden_layers=args.te_layers)
    policy = Policy(jnp.bfloat16 if args.dtype == "bf16" else jnp.float32, param_dtype=jnp.float32)
    te, un = clip_lib.CLIPTextModel(tcfg, policy=policy), unet_lib.UNet2DConditionModel(ucfg, policy=policy)
    va = vae_lib.AutoencoderKL(vae_lib.VAEConfig.tiny(), policy=policy)   # unused: the batch holds latents

    def init(key):
        return {"text_encoder": te.init_params(jax.random.fold_in(key, 1)),
                "unet": un.init(jax.random.fold_in(key, 2), *un.dummy_inputs())["params"]}
    params = step.compile_cheap(init, jax.random.key(0))(jax.random.key(0))
    loss = DiffusionLoss(te, un, va, remat=args.remat)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.standard_normal((args.batch, args.latent, args.latent, 4)).astype(np.float32),
             "input_ids": rng.integers(0, tcfg.vocab_size, (args.batch, tcfg.max_position_embeddings)).astype(np.int32)}
    return params, loss, batch


def measure(name, loss, opt, state, frozen, batch, mesh, steps):
    rep = sharding.replicated(mesh)
    batch = sharding.shard_batch(batch, mesh)
    fn = step._train_step_jit(tuple(sorted(step.COMPILER_OPTIONS.items())))
    t0 = time.perf_counter()
    compiled = fn.lower(loss, opt, 0, rep, state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    state, metrics = fn(loss, opt, 0, rep, state, frozen, batch)   # warm-up (first run)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(loss, opt, 0, rep, state, frozen, batch)
    jax.block_until_ready(metrics)
    sps = steps / (time.perf_counter() - t0)
    labels = optim.labels_for(state["params"], opt.trainable)
    n_train, _ = optim.count_trainable(state["params"], labels)
    row = {"run": name, "trained_params": n_train, "steps_per_s": round(sps, 3), "compile_s": round(compile_s, 1),
           "peak_gib": round(peak / 2**30, 3), "temp_gib": round(m.temp_size_in_bytes / 2**30, 3),
           "arguments_gib": round(m.argument_size_in_bytes / 2**30, 3), "loss": float(metrics["loss"])}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="320,640,1280,1280", help="UNet block widths (default: SD 1.5's)")
    p.add_argument("--layers", type=int, default=2, help="UNet layers per block")
    p.add_argument("--te-layers", type=int, default=12, help="text encoder layers")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512x512 images)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--targets", default="attn", help=f"comma-separated from {', '.join(TARGETS)}")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--base-dtype", choices=list(BASE_DTYPES), default="fp32")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (after one warm-up step)")
    args = p.parse_args(argv)
    mesh = sharding.make_mesh(jax.devices()[:1])
    rep = sharding.replicated(mesh)
    params, loss, batch = build(args)
    print(json.dumps({"device": jax.devices()[0].device_kind, "widths": args.widths, "layers": args.layers,
                      "te_layers": args.te_layers, "latent": args.latent, "batch": args.batch, "rank": args.rank,
                      "targets": args.targets, "dtype": args.dtype, "base_dtype": args.base_dtype,
                      "remat": args.remat}), flush=True)

    # full fine-tuning of the UNet (the text encoder frozen inside the optimizer's tree)
    opt = optim.OptimConfig(lr=1e-5, steps=100, trainable=("unet",))
    state = step.init_state_jit(opt, rep, sharding.replicate(params, mesh))
    full = measure("full fine-tune (unet)", loss, opt, state, {}, batch, mesh, args.steps)
    del state

    # LoRA on the same model and loss
    table = TargetTable(params)
    targets = select_targets(table, tuple(t.strip() for t in args.targets.split(",")))
    dt = BASE_DTYPES[args.base_dtype]
    frozen = sharding.replicate(jax.tree.map(lambda x: x.astype(dt), params), mesh)
    del params
    lora = {"lora": init_lora(lora_shapes(table, targets, args.rank), 0)}
    opt = optim.OptimConfig(lr=1e-4, steps=100, trainable=("lora",))
    state = step.init_state_jit(opt, rep, sharding.replicate(lora, mesh))
    ours = measure(f"LoRA rank {args.rank} ({args.targets}, {len(targets)} layers)", LoraLoss(loss, targets, 1.0),
                   opt, state, frozen, batch, mesh, args.steps)
    print(json.dumps({"lora_vs_full_steps_per_s": round(ours["steps_per_s"] / full["steps_per_s"], 2),
                      "lora_vs_full_peak_memory": round(ours["peak_gib"] / full["peak_gib"], 3)}))


if __name__ == "__main__":
    main()
