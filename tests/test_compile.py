"""Compile size: the generation program holds each network as often as expected (a second
traced copy of the UNet doubles its compile: only programs with a guidance window have one), the im2col convolution's patches compile
as one kernel and give the same matrix as before, the text encoders run once for prompt and
negative prompt; and the CLI's ``--attention`` choices."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import cli, jaxpr_stats, pipeline
from sd_jax.models import layers
from sd_jax.request import GenerationRequest

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "sd-jax-shapes")


@pytest.fixture(scope="module")
def pipe():
    return pipeline.StableDiffusionPipeline.from_pretrained(SHIPPED)


def _program(pipe, loop="scan", **request):
    r, plan = pipe.resolve(GenerationRequest("a red circle", negative_prompt="blue", height=64, width=64,
                                             **request), loop=loop)
    batch = pipe._inputs(plan, [r, r])
    f = functools.partial(pipeline._generate, pipe.models, pipe.family.prompt, plan)
    return jax.make_jaxpr(f)(pipe.params, batch), plan, batch


@pytest.mark.parametrize("request_, loop, expected", [
    # (guidance_end=1: guidance at every step, overriding the shipped model's recommended window)
    # guidance: one UNet call on the doubled batch per step, in one scan body; prompts and
    # negative prompts through one text-encoder call
    (dict(steps=3, guidance=7.5), "scan", dict(unet=1, text_encoder=1, vae_decode=1)),
    # a second-order sampler evaluates the UNet twice per step, still one traced body
    (dict(steps=3, guidance=7.5, scheduler="heun"), "scan", dict(unet=1, text_encoder=1, vae_decode=1)),
    (dict(steps=3, guidance=1.0), "scan", dict(unet=1, text_encoder=1, vae_decode=1)),
    # clip_skip applies to the prompt only (diffusers), so the negative is encoded apart
    (dict(steps=3, guidance=7.5, clip_skip=1), "scan", dict(unet=1, text_encoder=2, vae_decode=1)),
    # the unrolled debugging loop: one UNet per step (shows the count counts)
    (dict(steps=3, guidance=7.5, scheduler="ddim"), "python", dict(unet=3, text_encoder=1, vae_decode=1)),
    # a guidance window (the shipped model's default, 0.85): unguided steps run the conditional
    # half alone, a second UNet trace, in programs with a window only
    (dict(steps=3, guidance=7.5, guidance_end=None), "scan", dict(unet=2, text_encoder=1, vae_decode=1)),
])
def test_generation_traces_each_network_as_often_as_expected(pipe, request_, loop, expected):
    jaxpr, _, _ = _program(pipe, loop, **{"guidance_end": 1.0, **request_})
    assert jaxpr_stats.network_traces(jaxpr) == expected


def test_one_text_encoder_call_equals_two(pipe):
    """_encode_pair's (cond, uncond) equal the prompt and the negative prompt encoded apart."""
    _, plan, batch = _program(pipe, steps=2, guidance=7.5, prompt_syntax="plain")
    enc = pipe.family.prompt
    cond, uncond = jax.jit(lambda p, b: pipeline._encode_pair(pipe.models, enc, p, b, None))(pipe.params, batch)
    two = jax.jit(lambda p, ids: pipeline.encode_prompt(pipe.models, enc, p, ids, None))
    np.testing.assert_allclose(cond.context, two(pipe.params, batch["ids"]).context, rtol=0, atol=1e-6)
    np.testing.assert_allclose(uncond.context, two(pipe.params, batch["neg_ids"]).context, rtol=0, atol=1e-6)
    assert not np.allclose(cond.context, uncond.context)  # the halves are not swapped


def _shifted_slices_im2col(x, kernel, stride, padding):
    """The previous formulation: kh*kw shifted slices concatenated along channels."""
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    cols = jnp.concatenate([x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(cols.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout)).reshape(b, ho, wo, cout)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (2, 1, 0)])
def test_im2col_patches_are_one_kernel_and_the_same_result(k, stride, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 16, 8)), jnp.float32)
    new = jax.jit(layers.conv_im2col, static_argnums=(2, 3))
    old = jax.jit(_shifted_slices_im2col, static_argnums=(2, 3))
    np.testing.assert_array_equal(np.asarray(new(x, kernel, stride, pad)), np.asarray(old(x, kernel, stride, pad)))
    if jax.default_backend() == "cpu" and k == 3:
        kernels = lambda f: f.lower(x, kernel, stride, pad).compile().as_text().count("kind=kLoop")  # noqa: E731
        # pad, row-shifted views, column-shifted views; the slices were a kernel per tap
        assert kernels(new) <= 3 < kernels(old) - 3, (kernels(new), kernels(old))


@pytest.mark.parametrize("command", [["generate", "a cat"], ["batch", "prompts.txt", "--out", "o"], ["serve"],
                                     ["precompile", "--shapes", "64x64:2"]])
def test_attention_choices_are_offered_where_the_pipeline_is_built(command):
    for impl in ("auto", "xla", "pallas"):
        assert cli.build_parser().parse_args(command + ["--attention", impl]).attention == impl


def test_attention_pallas_off_a_tpu_is_one_line_error(capsys, tmp_path):
    assert jax.default_backend() != "tpu"
    # the CLI turns on the persistent cache (process-wide): put the settings back afterwards
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    saved = {k: getattr(jax.config, k) for k in keys}
    try:
        code = cli.main(["generate", "a red circle", "--model", SHIPPED, "--size", "64x64", "--steps", "2",
                         "--attention", "pallas", "--compile-cache", str(tmp_path / "cache"),
                         "-o", str(tmp_path / "a.png")])
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("sd-jax: error: --attention pallas: ") and "TPU" in err[0] and "'auto'" in err[0], err
    assert not (tmp_path / "a.png").exists()
