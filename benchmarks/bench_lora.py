"""Loading + merging a LoRA: sd-jax (``pipe.load_lora``) vs diffusers (``load_lora_weights`` + ``fuse_lora``).

    python benchmarks/bench_lora.py                     # SD 1.5 widths, rank 32, every UNet block
    python benchmarks/bench_lora.py --layers 1 --te-layers 4   # fewer layers (less memory)
    python benchmarks/bench_lora.py --family sdxl --depth 1,2,2 --te-layers 12 --te2-layers 8
                                                        # SDXL widths, fewer transformer layers

The LoRA is a kohya file with random factors of rank ``--rank`` on every layer kohya's
default LoRA trains: the UNet's transformer blocks (attention q/k/v/out, feed-forward,
proj_in/out) and the text encoder's attention and MLP layers, at SD 1.5's widths (320 / 640
/ 1280, cross-attention 768, text encoder 768; ``--family sdxl``: SDXL's 320 / 640 / 1280 with
cross-attention 2048, CLIP ViT-L 768 and OpenCLIP bigG 1280, ``--depth`` transformer layers per
level, the UNet in SGM names and ``lora_te1_`` / ``lora_te2_`` as kohya's SDXL scripts write).
Both sides read the same file in the same process:

* sd-jax: :meth:`StableDiffusionPipeline.load_lora` (read, match, upload, merge on the
  device) on the model's parameters; "cold" includes compiling the merge functions (once per
  factor shape per process), "warm" is a second LoRA of the same rank.  Only the layers the
  LoRA changes are materialised on the sd-jax side (the others play no part in a merge).
* diffusers: ``StableDiffusionPipeline.lora_state_dict`` + ``load_lora_into_unet`` /
  ``load_lora_into_text_encoder`` + ``fuse_lora`` on a ``UNet2DConditionModel`` and
  ``CLIPTextModel`` of the same config (weights allocated empty; the LoRA's layers filled).

Prints one JSON line per side (seconds, median of ``--iters`` warm runs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import families, sharding
from sd_jax.lora import LoraSet
from sd_jax.lora import saving
from sd_jax.lora.targets import TargetTable
from sd_jax.models.clip import CLIPTextConfig
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig
from sd_jax.weights.convert import unflatten
from sd_jax.weights.safetensors_io import save_file

TARGET_UNET = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
               "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out")
TARGET_TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def configs(layers: int, te_layers: int, family: str = "sd15", depth=(1, 2, 10), te2_layers: int = 32):
    if family == "sdxl":
        return {"unet": UNetConfig.sdxl(layers_per_block=layers, transformer_layers_per_block=tuple(depth)),
                "text_encoder": CLIPTextConfig.sd15(num_hidden_layers=te_layers),
                "text_encoder_2": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                 num_hidden_layers=te2_layers, hidden_act="gelu", projection_dim=1280),
                "vae": VAEConfig()}
    return {"unet": UNetConfig(layers_per_block=layers), "text_encoder": CLIPTextConfig.sd15(num_hidden_layers=te_layers),
            "vae": VAEConfig()}


def write_lora(path: str, shapes: dict, rank: int, seed: int) -> dict:
    """A kohya file on the usual targets (written by sd-jax's own kohya writer: SDXL's UNet in
    SGM names); returns ``{component: [module path, ...]}``."""
    rng = np.random.default_rng(seed)
    table = TargetTable(shapes)
    factors, targets = {}, {}
    for comp in shapes:
        ends = TARGET_UNET if comp == "unet" else TARGET_TE
        for mpath, v in table.kernels[comp].items():
            if not "_".join(mpath).endswith(ends):
                continue
            shape = tuple(v.shape)  # Flax: (in, out) or (1, 1, in, out)
            n_in, n_out = shape[-2], shape[-1]
            extra = (1, 1) if len(shape) == 4 else ()
            node = factors.setdefault(comp, {})
            for k in mpath:
                node = node.setdefault(k, {})
            node["down"] = (rng.standard_normal((rank, n_in) + extra) * 0.01).astype(np.float32)
            node["up"] = (rng.standard_normal((n_out, rank) + extra) * 0.01).astype(np.float32)
            targets.setdefault(comp, []).append(mpath)
    saving.save_kohya(path, table, factors, rank, rank / 2)
    return targets


def sd_jax_pipe(shapes: dict, targets: dict, cfg: dict, family=families.SD1):
    """A stand-in pipeline holding only the kernels the LoRA changes (random, on the device;
    the other layers are empty)."""
    key, table = jax.random.key(0), TargetTable(shapes)
    params = {}
    for comp, paths in targets.items():
        # Every other layer is an empty placeholder: a merge never reads it, but the layer list
        # is what SGM block numbers are counted from.
        flat = {p + ("kernel",): jnp.zeros((0,)) for p in table.kernels[comp]}
        for p in paths:
            key, sub = jax.random.split(key)
            flat[p + ("kernel",)] = jax.random.normal(sub, table.kernels[comp][p].shape) * 0.02
        params[comp] = unflatten(flat)
    mesh = sharding.make_mesh(jax.devices()[:1])
    pipe = types.SimpleNamespace(params=sharding.replicate(params, mesh), mesh=mesh, family=family,
                                 models=types.SimpleNamespace(unet=types.SimpleNamespace(config=cfg["unet"])))
    pipe.loras = LoraSet(pipe)
    return pipe


def bench_sd_jax(pipe, files, iters):
    def once(f):
        t = time.perf_counter()
        pipe.loras.load(f)
        jax.block_until_ready(pipe.params)
        dt = time.perf_counter() - t
        pipe.loras.unload()
        return dt
    cold = once(files[0])
    warm = [once(files[1 + i % (len(files) - 1)]) for i in range(iters)]
    t = time.perf_counter()
    pipe.loras.load(files[0])
    pipe.loras.set_weights([0.5])
    jax.block_until_ready(pipe.params)
    reweight = time.perf_counter() - t
    return {"side": "sd-jax", "cold_s": round(cold, 3), "warm_s": round(statistics.median(warm), 3),
            "load_then_reweight_s": round(reweight, 3), "device": jax.devices()[0].device_kind}


def bench_diffusers(cfg: dict, targets: dict, files, iters):
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, unfuse_text_encoder_lora
    from diffusers.utils.peft_utils import delete_adapter_layers
    from transformers import CLIPTextConfig as TorchCLIPConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_jax.weights.convert import path_to_torch_key
    sdxl = "text_encoder_2" in cfg
    pipe_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    ucfg = {k: v for k, v in cfg["unet"].to_dict().items() if not k.startswith("_")}
    encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)

    def clip(te, cls):
        return cls(TorchCLIPConfig(vocab_size=te.vocab_size, hidden_size=te.hidden_size,
                                   intermediate_size=te.intermediate_size, num_hidden_layers=te.num_hidden_layers,
                                   num_attention_heads=te.num_attention_heads, hidden_act=te.hidden_act,
                                   max_position_embeddings=te.max_position_embeddings,
                                   projection_dim=te.projection_dim or 768))
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**ucfg)}
        for name in encoders:
            models[name] = clip(cfg[name], CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)
    models = {k: m.to_empty(device="cpu").eval() for k, m in models.items()}
    with torch.no_grad():  # fill the LoRA's layers (empty memory may hold NaNs or denormals)
        for comp, model in models.items():
            mods = dict(model.named_modules())
            for p in targets[comp]:
                name = path_to_torch_key(p)
                mods.get(name, mods.get(name.removeprefix("text_model."))).weight.normal_(0, 0.02)

    def once(f):
        t = time.perf_counter()
        sd, alphas = pipe_cls.lora_state_dict(f, unet_config=models["unet"].config)  # SGM names need it
        pipe_cls.load_lora_into_unet(sd, alphas, unet=models["unet"], adapter_name="x")
        for name in encoders:
            pipe_cls.load_lora_into_text_encoder(sd, alphas, text_encoder=models[name], prefix=name,
                                                 adapter_name="x")
        models["unet"].fuse_lora(lora_scale=1.0)
        for name in encoders:
            fuse_text_encoder_lora(models[name], lora_scale=1.0)
        dt = time.perf_counter() - t
        models["unet"].unfuse_lora()
        models["unet"].delete_adapters("x")
        for name in encoders:
            unfuse_text_encoder_lora(models[name])
            delete_adapter_layers(models[name], "x")  # transformers' delete_adapter wants a newer peft
            getattr(models[name], "peft_config", {}).pop("x", None)
        return dt
    cold = once(files[0])
    warm = [once(files[1 + i % (len(files) - 1)]) for i in range(iters)]
    return {"side": "diffusers", "cold_s": round(cold, 3), "warm_s": round(statistics.median(warm), 3),
            "torch_threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2, help="UNet layers_per_block (SD 1.5 and SDXL: 2)")
    ap.add_argument("--depth", default="1,2,10", help="SDXL: transformer layers per level (SDXL: 1,2,10)")
    ap.add_argument("--te-layers", type=int, default=12, help="(first) text encoder layers (SD 1.5, SDXL: 12)")
    ap.add_argument("--te2-layers", type=int, default=32, help="SDXL: OpenCLIP bigG layers (SDXL: 32)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    family = families.SDXL if args.family == "sdxl" else families.SD1
    depth = tuple(int(d) for d in args.depth.split(","))
    cfg = configs(args.layers, args.te_layers, args.family, depth, args.te2_layers)
    models = families.build_models(family, cfg)
    shapes = {c.name: c.param_shapes(getattr(models, c.name)) for c in family.components if c.name != "vae"}
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"lora{i}.safetensors") for i in range(3)]
        targets = [write_lora(f, shapes, args.rank, seed=i) for i, f in enumerate(files)][0]
        n = sum(len(v) for v in targets.values())
        print(json.dumps({"family": args.family, "rank": args.rank, "layers_per_block": args.layers,
                          **({"depth": list(depth), "te2_layers": args.te2_layers} if args.family == "sdxl" else {}),
                          "te_layers": args.te_layers, "lora_layers": n,
                          "file_mb": round(os.path.getsize(files[0]) / 2**20, 1)}))
        print(json.dumps(bench_sd_jax(sd_jax_pipe(shapes, targets, cfg, family), files, args.iters)), flush=True)
        if not args.skip_torch:
            print(json.dumps(bench_diffusers(cfg, targets, files, args.iters)))


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
