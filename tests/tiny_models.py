"""Tiny random Stable Diffusion pipelines saved by diffusers PyTorch (the reference)."""
from __future__ import annotations

import os

import numpy as np

DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def build_tiny_pipeline(folder: str, *, in_channels: int = 4, seed: int = 0, prediction_type: str = "epsilon",
                        clip_sample_size: int = 16):
    """Write a tiny random diffusers StableDiffusionPipeline folder; returns the torch pipeline."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline, \
        UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sd_jax.data.tokenizer import write_tokenizer
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig

    torch.manual_seed(seed)
    tok_dir = os.path.join(folder, "_tok")
    vocab = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    eos = tokenizer.eos_token_id
    te = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=eos, pad_token_id=eos)).eval()
    ucfg = UNetConfig.tiny(in_channels=in_channels, sample_size=clip_sample_size).to_dict()
    unet = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}).eval()
    vcfg = VAEConfig.tiny().to_dict()
    vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")}).eval()
    # Random weights give latents/outputs of wildly different scales; shrink the UNet's
    # output so that images stay in a range where comparisons mean something.
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
    sched = DDIMScheduler(prediction_type=prediction_type, **DDIM)
    cls = StableDiffusionInpaintPipeline if in_channels == 9 else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # Reload, so the reference sees exactly the folder sd-jax reads (an in-memory
    # scheduler config omits defaulted keys, and from_config then takes another
    # class's defaults, e.g. Euler's "linspace" spacing instead of the saved "leading").
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return np.asarray(t.detach().float().numpy()).transpose(0, 2, 3, 1)
