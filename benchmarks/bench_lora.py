"""Loading + merging a LoRA: sd-jax (``pipe.load_lora``) vs diffusers (``load_lora_weights`` + ``fuse_lora``).

    python benchmarks/bench_lora.py                     # SD 1.5 widths, rank 32, every UNet block
    python benchmarks/bench_lora.py --layers 1 --te-layers 4   # fewer layers (less memory)

The LoRA is a kohya file with random factors of rank ``--rank`` on every layer kohya's
default LoRA trains: the UNet's transformer blocks (attention q/k/v/out, feed-forward,
proj_in/out) and the text encoder's attention and MLP layers, at SD 1.5's widths (320 / 640
/ 1280, cross-attention 768, text encoder 768).  Both sides read the same file in the same
process:

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
from sd_jax.lora.targets import TargetTable
from sd_jax.models.clip import CLIPTextConfig
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig
from sd_jax.weights.convert import unflatten
from sd_jax.weights.safetensors_io import save_file

TARGET_UNET = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
               "attn2_to_v", "attn2_to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out")
TARGET_TE = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def configs(layers: int, te_layers: int):
    return {"unet": UNetConfig(layers_per_block=layers), "text_encoder": CLIPTextConfig.sd15(num_hidden_layers=te_layers),
            "vae": VAEConfig()}


def write_lora(path: str, shapes: dict, rank: int, seed: int) -> dict:
    """A kohya file on the usual targets; returns ``{component: [module path, ...]}``."""
    rng = np.random.default_rng(seed)
    table = TargetTable(shapes)
    sd, targets = {}, {}
    for comp, prefix, ends in (("unet", "lora_unet_", TARGET_UNET), ("text_encoder", "lora_te_", TARGET_TE)):
        for mpath, v in table.kernels[comp].items():
            name = "_".join(mpath)
            if not name.endswith(ends):
                continue
            shape = tuple(v.shape)  # Flax: (in, out) or (1, 1, in, out)
            n_in, n_out = shape[-2], shape[-1]
            extra = (1, 1) if len(shape) == 4 else ()
            sd[f"{prefix}{name}.lora_down.weight"] = (rng.standard_normal((rank, n_in) + extra) * 0.01).astype(np.float32)
            sd[f"{prefix}{name}.lora_up.weight"] = (rng.standard_normal((n_out, rank) + extra) * 0.01).astype(np.float32)
            sd[f"{prefix}{name}.alpha"] = np.asarray(rank / 2, np.float32)
            targets.setdefault(comp, []).append(mpath)
    save_file(sd, path)
    return targets


def sd_jax_pipe(shapes: dict, targets: dict, cfg: dict):
    """A stand-in pipeline holding only the kernels the LoRA changes (random, on the device)."""
    key, table = jax.random.key(0), TargetTable(shapes)
    params = {}
    for comp, paths in targets.items():
        flat = {}
        for p in paths:
            key, sub = jax.random.split(key)
            flat[p + ("kernel",)] = jax.random.normal(sub, table.kernels[comp][p].shape) * 0.02
        params[comp] = unflatten(flat)
    mesh = sharding.make_mesh(jax.devices()[:1])
    pipe = types.SimpleNamespace(params=sharding.replicate(params, mesh), mesh=mesh, family=families.SD1,
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
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.lora_base import fuse_text_encoder_lora, unfuse_text_encoder_lora
    from diffusers.utils.peft_utils import delete_adapter_layers
    from transformers import CLIPTextConfig as TorchCLIPConfig, CLIPTextModel

    from sd_jax.weights.convert import path_to_torch_key
    ucfg = {k: v for k, v in cfg["unet"].to_dict().items() if not k.startswith("_")}
    te = cfg["text_encoder"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**ucfg)
        text = CLIPTextModel(TorchCLIPConfig(vocab_size=te.vocab_size, hidden_size=te.hidden_size,
                                             intermediate_size=te.intermediate_size,
                                             num_hidden_layers=te.num_hidden_layers,
                                             num_attention_heads=te.num_attention_heads,
                                             max_position_embeddings=te.max_position_embeddings))
    unet, text = unet.to_empty(device="cpu").eval(), text.to_empty(device="cpu").eval()
    with torch.no_grad():  # fill the LoRA's layers (empty memory may hold NaNs or denormals)
        for comp, model in (("unet", unet), ("text_encoder", text)):
            mods = dict(model.named_modules())
            for p in targets[comp]:
                name = path_to_torch_key(p)
                mods.get(name, mods.get(name.removeprefix("text_model."))).weight.normal_(0, 0.02)

    def once(f):
        t = time.perf_counter()
        sd, alphas = StableDiffusionPipeline.lora_state_dict(f)
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=unet, adapter_name="x")
        StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, text_encoder=text, adapter_name="x")
        unet.fuse_lora(lora_scale=1.0)
        fuse_text_encoder_lora(text, lora_scale=1.0)
        dt = time.perf_counter() - t
        unet.unfuse_lora()
        unet.delete_adapters("x")
        unfuse_text_encoder_lora(text)
        delete_adapter_layers(text, "x")  # transformers' delete_adapter wants a newer peft
        getattr(text, "peft_config", {}).pop("x", None)
        return dt
    cold = once(files[0])
    warm = [once(files[1 + i % (len(files) - 1)]) for i in range(iters)]
    return {"side": "diffusers", "cold_s": round(cold, 3), "warm_s": round(statistics.median(warm), 3),
            "torch_threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2, help="UNet layers_per_block (SD 1.5: 2)")
    ap.add_argument("--te-layers", type=int, default=12, help="text encoder layers (SD 1.5: 12)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    cfg = configs(args.layers, args.te_layers)
    models = families.build_models(families.SD1, cfg)
    shapes = {c.name: c.param_shapes(getattr(models, c.name)) for c in families.SD1.components if c.name != "vae"}
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, f"lora{i}.safetensors") for i in range(3)]
        targets = [write_lora(f, shapes, args.rank, seed=i) for i, f in enumerate(files)][0]
        n = sum(len(v) for v in targets.values())
        print(json.dumps({"rank": args.rank, "layers_per_block": args.layers, "te_layers": args.te_layers,
                          "lora_layers": n, "file_mb": round(os.path.getsize(files[0]) / 2**20, 1)}))
        print(json.dumps(bench_sd_jax(sd_jax_pipe(shapes, targets, cfg), files, args.iters)), flush=True)
        if not args.skip_torch:
            print(json.dumps(bench_diffusers(cfg, targets, files, args.iters)))


if __name__ == "__main__":
    jnp.zeros(())  # start the backend before timing
    main()
