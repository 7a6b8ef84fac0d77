"""Compile sd-jax's programs for a Cloud TPU from this (CPU) machine, and read their memory.

    pip install "libtpu==0.0.42.*"        # the TPU compiler (jax[tpu]'s pin for jax 0.10.2)
    python benchmarks/tpu_aot.py                                   # SD 1.5, SD 2.1, SDXL generation
    python benchmarks/tpu_aot.py --programs sd15 --topology v5e:2x4 --batch 1 8
    python benchmarks/tpu_aot.py --programs sdxl-train --attention flash xla

JAX can compile for TPU devices it does not have: ``jax.experimental.topologies`` gives
compile-only devices of a named TPU slice (here an 8-chip v5e, 16 GiB of HBM per chip) once
libtpu is importable.  Nothing runs and no weights exist: the parameters are abstract
(``jax.ShapeDtypeStruct``, replicated or FSDP-sharded over the slice), and each program is
traced, lowered and compiled by the real TPU compiler, exactly as ``sd-jax`` would on the TPU
VM (``sharding.tracing_for`` makes the model code trace for the TPU: ``attention="auto"`` picks
the Pallas kernel, and the CPU-only lowerings are off).  XLA's ``memory_analysis()`` of the
compiled per-chip program is then the TPU's own figure, not a CPU estimate, and a
``tpu_custom_call`` in the compiled program shows the Pallas kernel went through Mosaic.

Programs:

* ``sd15`` / ``sd21`` / ``sdxl``: one whole generation (prompt encoding, ``--steps`` steps in one
  ``lax.scan`` with classifier-free guidance, VAE decode, uint8 out) at the model's size,
  ``--batch`` images per chip, bf16 compute and weights;
* ``sdxl-train``: the SDXL base UNet's fine-tuning step at 1024x1024 (what
  ``benchmarks/train_memory.py`` measures on the CPU): bf16 compute, float32 master weights
  and AdamW moments, per-block remat, parameters and optimizer state sharded over the chips
  (``--shard-params``), ``--batch`` images per chip.  ``--attention flash`` uses JAX's Pallas
  TPU flash attention (forward and backward kernels, :mod:`sd_jax.models.attention`'s
  ``"flash"``), ``xla`` the plain formulation.

Prints one JSON line per program: compile seconds (CPU), per-chip arguments / outputs /
temporaries / peak GiB, whether it fits the chip's HBM, the Mosaic kernel count and FLOPs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 2 ** 30
HBM = {"v5e": 16, "v5litepod": 16, "v4": 32, "v5p": 95, "v6e": 32}


def tpu_mesh(topology: str):
    import jax
    from jax.experimental import topologies
    try:
        topo = topologies.get_topology_desc(topology, "tpu")
    except Exception as e:   # no libtpu: say how to get it
        raise SystemExit(f"cannot describe TPU topology {topology!r} ({str(e).splitlines()[0][:200]}); "
                         "install the TPU compiler: pip install 'libtpu==0.0.42.*'") from None
    return jax.sharding.Mesh(__import__("numpy").asarray(topo.devices), ("data",))


def _abstract(tree, sharding):
    import jax
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _configs(name: str) -> tuple:
    from sd_jax import families
    from sd_jax.models import clip, unet, vae
    if name == "sdxl":
        return families.SDXL, {
            "text_encoder": clip.CLIPTextConfig.sd15(),
            "text_encoder_2": clip.CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                  num_hidden_layers=32, hidden_act="gelu", projection_dim=1280),
            "unet": unet.UNetConfig.sdxl(), "vae": vae.VAEConfig(sample_size=1024, scaling_factor=0.13025),
            "scheduler": families.sdxl_scheduler_config()}
    fam = families.get("sd1" if name == "sd15" else "sd2")
    return fam, fam.configs(name)


def generation(name: str, mesh, batch: int, steps: int, attention: str):
    """(jitted fn, abstract params, abstract batch) of one whole generation on ``mesh``."""
    import jax
    import jax.numpy as jnp

    from sd_jax import families, pipeline, sharding
    from sd_jax.diffusion.samplers import SchedulerConfig
    from sd_jax.request import GenerationRequest
    from sd_jax.weights.single_file import tokenizers_for

    fam, cfg = _configs(name)
    models = families.build_models(fam, cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attention)
    toks = tokenizers_for({"sdxl": "sdxl", "sd15": "sd1", "sd21": "sd2"}[name])
    pipe = pipeline.StableDiffusionPipeline(models, {}, next(iter(toks.values())),
                                            SchedulerConfig.from_dict(cfg["scheduler"]), fam.default_sampler,
                                            family=fam, tokenizers=toks)
    pipe.watermark = False
    params = {c.name: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16),
                                   c.param_shapes(getattr(models, c.name))) for c in fam.components}
    r, plan = pipe.resolve(GenerationRequest("a photograph of an astronaut riding a horse", steps=steps))
    rows = batch * mesh.size
    host = {k: sharding.pad_batch(v, rows) for k, v in pipe._inputs(plan, [r] * rows).items()}
    plan = pipe._vae_tiled(plan, rows)
    inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharded(mesh)) for k, v in host.items()}
    fn = jax.jit(lambda p, b: pipeline._generate(models, fam.prompt, plan, p, b),
                 out_shardings=sharding.batch_sharded(mesh))
    return fn, (_abstract(params, sharding.replicated(mesh)), inputs), {"size": plan.latent_shape[0] * 8,
                                                                        "steps": steps}


def sdxl_train(mesh, batch: int, attention: str):
    """The SDXL UNet's training step of ``benchmarks/train_memory.py``, FSDP-sharded over ``mesh``."""
    from sd_jax.train import step
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_memory

    loss, params, frozen, data = train_memory.build("sdxl", batch, attention, devices=mesh.size)
    opt, shard, state, frozen, data = train_memory.step_args(params, frozen, data, mesh, "sharded")
    jitted = step._train_step_jit(())
    return (lambda *a: jitted.lower(loss, opt, 0, shard, *a)), (state, frozen, data), {"size": 1024}


def measure(program: str, topology: str, batch: int, steps: int, attention: str) -> dict:
    from sd_jax import sharding
    mesh = tpu_mesh(topology)
    chip = topology.split(":")[0]
    t0 = time.time()
    with sharding.tracing_for(mesh):
        if program == "sdxl-train":
            lower, args, info = sdxl_train(mesh, batch, attention)
            lowered = lower(*args)
        else:
            fn, args, info = generation(program, mesh, batch, steps, attention)
            lowered = fn.lower(*args)
        t1 = time.time()
        compiled = lowered.compile()
    t2 = time.time()
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    hbm = HBM.get(chip)
    return {"program": program, "topology": topology, "chips": mesh.size, "device_kind": mesh.devices.flat[0].device_kind,
            "batch_per_chip": batch, "attention": attention, **info,
            "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
            "arguments_GiB": round(m.argument_size_in_bytes / GiB, 3), "outputs_GiB": round(m.output_size_in_bytes / GiB, 3),
            "aliased_GiB": round(m.alias_size_in_bytes / GiB, 3), "temp_GiB": round(m.temp_size_in_bytes / GiB, 3),
            "peak_GiB": round(peak / GiB, 3), "hbm_GiB": hbm, "fits": None if hbm is None else peak < hbm * GiB,
            "mosaic_kernels": text.count("tpu_custom_call"), "tflop_per_chip": round(cost.get("flops", 0) / 1e12, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--programs", nargs="+", default=["sd15", "sd21", "sdxl"],
                    choices=["sd15", "sd21", "sdxl", "sdxl-train"])
    ap.add_argument("--topology", default="v5e:2x4", help="a TPU slice, e.g. v5e:2x4 (8 chips), v4:2x2x1, v5e:1x1")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="images per chip")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attention", nargs="+", default=["auto"],
                    help="generation: auto (the Pallas kernel on TPU) / xla; sdxl-train: flash / xla")
    a = ap.parse_args(argv)
    for program in a.programs:
        for attention in a.attention:
            for batch in a.batch:
                print(json.dumps(measure(program, a.topology, batch, a.steps, attention)), flush=True)


if __name__ == "__main__":
    main()
