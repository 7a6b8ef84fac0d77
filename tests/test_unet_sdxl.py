"""The SDXL UNet (``addition_embed_type="text_time"``) against diffusers 0.42 PyTorch, float32.

As in tests/test_unet.py: diffusers builds the model from ``UNetConfig.to_dict()``, its
random weights are perturbed and saved with ``save_pretrained``, sd-jax reads the folder
with :func:`sd_jax.models.unet.load`; inputs/outputs are transposed NHWC <-> NCHW.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models.unet import UNet2DConditionModel, UNetConfig, load
from sd_jax.weights.convert import _torch_shape, flatten, path_to_torch_key, state_dict_to_params
from test_unet import TOL, _inputs, _run, _torch_out, _torch_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SDXL's default micro-conditioning at 1024x1024 (original size, crop top-left, target
# size), and a non-default one (a 768x1344 original, cropped at (64, 32)).
BASE_IDS = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 64, 32, 1024, 1024]], np.float32)
# The refiner's 5 ids: original size, crop top-left, aesthetic score.
REFINER_IDS = np.array([[1024, 1024, 0, 0, 6.0], [896, 1152, 16, 0, 2.5]], np.float32)


def _added(cfg, time_ids, seed=1):
    pooled = cfg.projection_class_embeddings_input_dim - time_ids.shape[1] * cfg.addition_time_embed_dim
    rng = np.random.default_rng(seed)
    return {"text_embeds": rng.standard_normal((time_ids.shape[0], pooled)).astype(np.float32),
            "time_ids": time_ids}


# refiner: 5 ids (so a 72-wide projection input) and the other sinusoid convention, which
# add_time_proj shares with the timestep embedding
CASES = {"base": (UNetConfig.tiny_sdxl(), BASE_IDS, np.array([999, 17])),
         "refiner": (UNetConfig.tiny_sdxl(projection_class_embeddings_input_dim=5 * 8 + 32,
                                           flip_sin_to_cos=False, freq_shift=1),
                     REFINER_IDS, np.array([250.5, 600.0], np.float32))}


@pytest.mark.parametrize("name", list(CASES))
def test_parity_tiny_sdxl(name, tmp_path):
    """Measured max |diff|: 3.1e-6 (base), 3.9e-6 (refiner-shaped); tolerance 1e-4.

    Batch 2: each sample its own time ids (the default 1024 ones and non-default ones),
    so a mix-up of the per-sample embedding would show."""
    cfg, time_ids, t = CASES[name]
    tm = _torch_unet(cfg)
    tm.save_pretrained(tmp_path / "unet")
    model, params = load(str(tmp_path / "unet"), dtype=jnp.float32)
    assert model.config == cfg
    assert set(params["add_embedding"]) == {"linear_1", "linear_2"}
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (cfg.projection_class_embeddings_input_dim,
                                                                   cfg.time_embed_dim)
    x, ctx = _inputs(cfg, 16, seq=5)
    added = _added(cfg, time_ids)
    ref = _torch_out(tm, x, t, ctx, added)
    out = np.asarray(_run(model, params, x, t, ctx, added))
    diff = float(np.abs(out - ref).max())
    print(f"tiny SDXL {name}: max |diff| {diff:.2e} (output max {np.abs(ref).max():.2f})")
    assert diff < TOL, diff
    # the conditioning is used: other time ids give another output
    other = {**added, "time_ids": added["time_ids"][::-1].copy()}
    moved = np.asarray(_run(model, params, x, t, ctx, other))
    assert np.abs(moved - out).max() > 1e-3
    np.testing.assert_allclose(moved, _torch_out(tm, x, t, ctx, other), atol=TOL, rtol=0)


def test_added_conditioning_errors():
    cfg = UNetConfig.tiny_sdxl()
    model = UNet2DConditionModel(cfg)
    x, t, ctx, added = model.dummy_inputs(batch=2)
    assert added["text_embeds"].shape == (2, 32) and added["time_ids"].shape == (2, 6)
    params = model.param_shapes()
    shape = lambda *a: jax.eval_shape(lambda p: model.apply({"params": p}, *a), params)  # noqa: E731
    assert shape(x, t, ctx, added).shape == x.shape
    with pytest.raises(ValueError, match="text_embeds.*time_ids.*missing: text_embeds, time_ids"):
        shape(x, t, ctx)
    with pytest.raises(ValueError, match="missing: time_ids"):
        shape(x, t, ctx, {"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="make 88 features.*projection_class_embeddings_input_dim=80"):
        shape(x, t, ctx, {**added, "time_ids": jnp.zeros((2, 7))})
    with pytest.raises(ValueError, match=r"time_ids'\] must be \[B=2, K\]"):
        shape(x, t, ctx, {**added, "time_ids": jnp.zeros((12,))})
    with pytest.raises(ValueError, match="needs addition_time_embed_dim"):
        UNetConfig.tiny_sdxl(addition_time_embed_dim=None)
    # an SD 1.x UNet ignores added conditioning, as diffusers does
    plain = UNet2DConditionModel(UNetConfig.tiny())
    assert plain.dummy_inputs()[3] is None


def test_tiny_sdxl_config_is_diffusers_sdxl_shaped():
    """DownBlock2D first, per-block transformer depth: diffusers builds the same blocks."""
    cfg = UNetConfig.tiny_sdxl()
    m = diffusers.UNet2DConditionModel.from_config(cfg.to_dict())
    assert type(m.down_blocks[0]).__name__ == "DownBlock2D"
    assert len(m.down_blocks[1].attentions[0].transformer_blocks) == 2
    assert len(m.up_blocks[0].attentions[2].transformer_blocks) == 2
    assert len(m.mid_block.attentions[0].transformer_blocks) == 2
    assert UNetConfig.from_dict(dict(m.config)) == cfg


def test_parity_sdxl_full_width(tmp_path):
    """SDXL's real widths (320/640/1280, 5/10/20 heads, 2048 context, 2816-wide
    add_embedding) with 1 transformer layer per block instead of 1/2/10 (640 M instead of
    2.6 B parameters), 16x16 latents, batch 1.  Measured max |diff|: 2.4e-6; tolerance 1e-4."""
    cfg = UNetConfig.sdxl(transformer_layers_per_block=(1, 1, 1))
    torch.manual_seed(0)
    tm = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    model = UNet2DConditionModel(cfg)
    params = state_dict_to_params({k: v.numpy() for k, v in tm.state_dict().items()},
                                  model.param_shapes(), what="unet")
    x, ctx = _inputs(cfg, 16, batch=1, seq=5)
    added = _added(cfg, BASE_IDS[1:])
    ref = _torch_out(tm, x, np.array([500]), ctx, added)
    del tm
    out = np.asarray(_run(model, params, x, np.array([500]), ctx, added))
    diff = float(np.abs(out - ref).max())
    print(f"SDXL full width: max |diff| {diff:.2e} (output max {np.abs(ref).max():.2f})")
    assert diff < TOL, diff


def test_sdxl_full_config_keys_and_shapes():
    """The full SDXL base UNet (1/2/10 transformer layers): every diffusers key and shape
    (a model on torch's meta device) is a parameter of the sd-jax model (jax.eval_shape)
    and the other way round; no weights, no compute."""
    cfg = UNetConfig.sdxl()
    with torch.device("meta"):
        tm = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    theirs = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    leaf = {"kernel": "weight", "scale": "weight"}
    ours = {}
    for path, s in flatten(UNet2DConditionModel(cfg).param_shapes()).items():
        key = path_to_torch_key(path[:-1] + (leaf.get(path[-1], path[-1]),))
        ours[key] = _torch_shape(tuple(s.shape), path[-1], len(theirs.get(key, ())))
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs
    assert sum(int(np.prod(v)) for v in ours.values()) > 2.5e9
    assert ours["add_embedding.linear_1.weight"] == (1280, 2816)
    assert sum(k.startswith("down_blocks.2.attentions.1.transformer_blocks.") and k.endswith("attn2.to_k.weight")
               for k in ours) == 10
