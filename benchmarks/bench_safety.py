"""Safety checker: sd-jax (jit, preprocessing on the device) vs diffusers' StableDiffusionSafetyChecker
(CLIPImageProcessor + forward, as diffusers' ``run_safety_checker``) on the same random weights,
same process, the same decoded uint8 images.

    python benchmarks/bench_safety.py                          # ViT-L/14 (SD 1.x/2.x), 8 x 512x512 images
    python benchmarks/bench_safety.py --config tiny --size 64  # quick check that it runs

Prints the median time per image of both (preprocessing included on both sides), their ratio,
and whether the flags agree.  Random concept thresholds are set around the images' cosines so
that some images are flagged.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from bench_vae import timeit     # benchmarks/ is on sys.path when a script in it runs

VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30,
            patch_size=6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("vit-l14", "tiny"), default="vit-l14")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="side of the generated images the checker sees")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    from sd_jax.models import clip_vision as cv
    from sd_jax.models import safety_checker as sc

    vision = VIT_L14 if args.config == "vit-l14" else TINY
    proj = 768 if args.config == "vit-l14" else 24
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=4),
                                  vision_config=vision, projection_dim=proj)
    ref = StableDiffusionSafetyChecker(cfg).eval()
    crop = vision["image_size"]
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    images = np.random.RandomState(0).randint(0, 256, (args.batch, args.size, args.size, 3)).astype(np.uint8)
    images[::2] //= 2      # two kinds of image, so that thresholds can split them
    with torch.no_grad():
        e = torch.nn.functional.normalize(ref.visual_projection(ref.vision_model(
            torch.tensor(proc(list(images), return_tensors="np")["pixel_values"]))[1]))
        ref.concept_embeds_weights.copy_((e @ torch.nn.functional.normalize(ref.concept_embeds).T).median(0).values)
        ref.special_care_embeds_weights.fill_(2.0)

    vcfg = cv.CLIPVisionConfig.from_dict(cfg.to_dict())
    checker, params = sc.from_state_dict(vcfg, {k: v.numpy() for k, v in ref.state_dict().items()},
                                         cv.PreprocessConfig(crop, crop), "bench")
    params = jax.device_put(params)
    run = jax.jit(checker.__call__)
    t = time.perf_counter()
    out = run(params, images)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t
    jax_s = timeit(lambda: jax.block_until_ready(run(params, images)), args.iters, args.warmup)[0] / 1e3

    def torch_check():
        from PIL import Image
        pil = [Image.fromarray(im) for im in images]          # diffusers: numpy_to_pil, then the extractor
        clip_input = torch.tensor(proc(pil, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            return ref(clip_input=clip_input, images=images.astype(np.float32) / 255)
    torch_s = timeit(torch_check, args.iters, args.warmup)[0] / 1e3
    _, ref_flags = torch_check()
    res = {"config": args.config, "batch": args.batch, "size": args.size, "jax_compile_s": round(compile_s, 2),
           "jax_s_per_image": round(jax_s / args.batch, 4), "torch_s_per_image": round(torch_s / args.batch, 4),
           "ratio": round(jax_s / torch_s, 3), "flags_equal": np.asarray(out[1]).tolist() == list(ref_flags),
           "flagged": int(np.asarray(out[1]).sum()), "devices": jax.device_count(),
           "torch_threads": torch.get_num_threads()}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
