"""Per-device memory of a UNet fine-tuning step, replicated vs ``--shard-params``, on 8 devices.

Nothing is run: the trainer's own compiled step (:func:`sd_jax.train.step._train_step_fn`,
bf16 compute, per-block remat, float32 master weights and float32 AdamW moments) is
lowered for abstract arrays on 8 fake CPU devices and compiled, and XLA's
``memory_analysis()`` of the per-device program gives its arguments (the state, the frozen
weights, the batch), its outputs and its temporaries.  Peak per device = arguments +
outputs - donated (aliased) + temporaries.

* ``sd15``: the ``finetune`` recipe's loss as it is (512x512 pixels through the frozen
  VAE encoder, the frozen CLIP text encoder, the SD 1.5 UNet trained);
* ``sdxl``: the SDXL base UNet (320/640/1280, 1/2/10 transformer layers, 2048-wide
  context, text_time) at 1024x1024 (128x128 latents).  This is the UNet-only denoising loss
  (the text encoders frozen outside the step) with the text encoders' outputs and
  the added conditioning (pooled embedding, 6 time ids) given as arrays.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/train_memory.py --model sd15 --batch 1
    python benchmarks/train_memory.py --model sdxl --batch 4 --layout sharded      # one configuration

(the script sets the 8 fake devices itself when XLA_FLAGS does not).  Each configuration
prints one JSON line; compiling the SDXL step on the CPU takes minutes and several GiB.
The CPU compiler's buffer assignment stands in for the TPU's: a TPU fuses differently,
so take the temporaries as an estimate, the state exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from typing import Any  # noqa: E402

from sd_jax import sharding  # noqa: E402
from sd_jax.models import clip as clip_lib  # noqa: E402
from sd_jax.models import unet as unet_lib  # noqa: E402
from sd_jax.models import vae as vae_lib  # noqa: E402
from sd_jax.models.policy import Policy  # noqa: E402
from sd_jax.train import optim, step  # noqa: E402
from sd_jax.train.losses import DiffusionLoss, add_noise, prediction_target, remat_blocks, NoiseSchedule  # noqa: E402

GiB = 2 ** 30
V5E_HBM = 16 * GiB


@dataclasses.dataclass(frozen=True)
class UNetOnlyLoss:
    """The epsilon-prediction denoising loss of a UNet alone (no encoders):
    ``batch = {"latents" [B, h, w, 4], "context" [B, 77, D], "text_embeds", "time_ids"}``."""
    unet: Any
    schedule: NoiseSchedule = NoiseSchedule()
    remat: bool = True

    def __call__(self, params, batch, key):
        k_t, k_noise = jax.random.split(key)
        x0 = batch["latents"].astype(jnp.float32)
        ac = self.schedule.alphas_cumprod()
        t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        xt = add_noise(x0, noise, t, ac)
        dt = self.unet.dtype
        added = {"text_embeds": batch["text_embeds"].astype(dt), "time_ids": batch["time_ids"]}

        def unet(p, x, tt, c):
            return self.unet.apply({"params": p}, x, tt, c, added)

        pred = (remat_blocks(unet) if self.remat else unet)(params["unet"], xt.astype(dt), t,
                                                             batch["context"].astype(dt))
        loss = jnp.mean((pred.astype(jnp.float32) - prediction_target(x0, noise, t, ac, "epsilon")) ** 2)
        return loss, {"mse": loss}


def build(model: str, batch: int, attention: str = "xla", devices: int | None = None):
    """(loss, abstract params, abstract frozen, abstract global batch) for ``batch`` per device
    on ``devices`` devices (default: this process's)."""
    # The plain formulation a TPU traces (no CPU-specific blocked attention or patch convolutions);
    # ``attention="chunked"``: the query-chunked formulation, whose memory is what a flash kernel's is.
    policy = Policy(jnp.bfloat16, param_dtype=jnp.float32, attention=attention, cpu_lowerings=False)
    b = batch * (devices or jax.device_count())
    i32, f32 = jnp.int32, jnp.float32
    if model == "sd15":
        te = clip_lib.CLIPTextModel(clip_lib.CLIPTextConfig.sd15(), policy=policy)
        un = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.sd15(), policy=policy)
        va = vae_lib.AutoencoderKL(vae_lib.VAEConfig.sd15(), policy=policy)
        params = {"text_encoder": jax.eval_shape(te.init_params, jax.random.key(0)), "unet": un.param_shapes()}
        frozen = {"vae": vae_lib.param_shapes(va)}
        loss = DiffusionLoss(te, un, va, remat=True)
        data = {"pixels": jax.ShapeDtypeStruct((b, 512, 512, 3), f32), "input_ids": jax.ShapeDtypeStruct((b, 77), i32)}
    elif model == "sdxl":
        un = unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.sdxl(), policy=policy)
        params, frozen = {"unet": un.param_shapes()}, {}
        loss = UNetOnlyLoss(un)
        data = {"latents": jax.ShapeDtypeStruct((b, 128, 128, 4), f32),
                "context": jax.ShapeDtypeStruct((b, 77, 2048), f32),
                "text_embeds": jax.ShapeDtypeStruct((b, 1280), f32), "time_ids": jax.ShapeDtypeStruct((b, 6), f32)}
    else:
        raise SystemExit(f"unknown model {model!r}")
    return loss, params, frozen, data


def with_shardings(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def step_args(params, frozen, data, mesh, layout: str):
    """``(opt, layout, state, frozen, batch)`` of the trainer's step on ``mesh``, abstract and
    placed as the trainer places them (state and frozen weights replicated or by name rules)."""
    opt = optim.OptimConfig(lr=1e-5, steps=1000, trainable=("unet",))
    rep = sharding.replicated(mesh)
    shard = sharding.ParamRules(mesh) if layout == "sharded" else rep
    state = jax.eval_shape(lambda p: step.init_state(opt, rep, p), params)
    state = with_shardings(state, sharding.shardings_for(state, shard))
    frozen = with_shardings(frozen, sharding.shardings_for(frozen, shard))
    data = with_shardings(data, jax.tree.map(lambda _: sharding.batch_sharded(mesh), data))
    return opt, shard, state, frozen, data


def measure(model: str, batch: int, layout: str, state_only: bool = False, attention: str = "xla") -> dict:
    mesh = sharding.make_mesh()
    loss, params, frozen, data = build(model, batch, attention)
    opt, shard, state, frozen, data = step_args(params, frozen, data, mesh, layout)
    per_dev = lambda tree: sum(s.dtype.itemsize * _shard_size(s) for s in jax.tree.leaves(tree))  # noqa: E731
    n_params = sum(x.size for x in jax.tree.leaves(params["unet"]))
    out = {"model": model, "layout": layout, "attention": attention, "batch_per_device": batch,
           "devices": jax.device_count(),
           "unet_params": n_params, "state_GiB": per_dev(state) / GiB, "frozen_GiB": per_dev(frozen) / GiB}
    if state_only:   # exact, from the shapes: nothing compiled
        return out
    t0 = time.time()
    # The trainer's jitted step (state donated); LLVM optimisation off only to compile faster:
    # buffer assignment, and so the memory figures, come from XLA's HLO passes before it.
    jitted = step._train_step_jit((("xla_backend_optimization_level", 0),))
    compiled = jitted.lower(loss, opt, 0, shard, state, frozen, data).compile()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    return {**out, "arguments_GiB": m.argument_size_in_bytes / GiB, "outputs_GiB": m.output_size_in_bytes / GiB,
            "aliased_GiB": m.alias_size_in_bytes / GiB, "temp_GiB": m.temp_size_in_bytes / GiB,
            "peak_GiB": peak / GiB, "fits_v5e_16GiB": peak < V5E_HBM, "compile_s": round(time.time() - t0, 1)}


def _shard_size(s: jax.ShapeDtypeStruct) -> int:
    shape = s.sharding.shard_shape(s.shape)
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["sd15", "sdxl"], nargs="+", default=["sd15", "sdxl"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="per device")
    p.add_argument("--layout", choices=["replicated", "sharded"], nargs="+", default=["replicated", "sharded"])
    p.add_argument("--state-only", action="store_true",
                   help="only the state's and frozen weights' bytes per device (exact; nothing compiled)")
    p.add_argument("--attention", choices=["xla", "chunked"], default="xla",
                   help="xla: full score matrices (default); chunked: query chunks, a flash kernel's memory")
    a = p.parse_args(argv)
    for model in a.model:
        for batch in a.batch:
            for layout in a.layout:
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in measure(model, batch, layout, a.state_only, a.attention).items()}), flush=True)


if __name__ == "__main__":
    main()
