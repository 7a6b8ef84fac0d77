"""SDXL as few-step users run it, the refiner in A1111 metadata, and the text encoders at real width.

* Few-step models against diffusers 0.42's ``StableDiffusionXLPipeline`` (fp32) on a tiny random
  SDXL saved in the hub layout (tests/test_sdxl_pipeline.py's builder), the same initial noise
  (sd-jax's, from the seed) on both sides: SDXL-Lightning's way (a UNet-only fp16 file into the
  base, ``unet=`` / ``--unet``; Euler at trailing timesteps, guidance 0), SDXL-Turbo's (Euler
  ancestral, trailing, guidance 0; diffusers draws sd-jax's per-step noise) and an
  LCM-distilled SDXL UNet with the LCM sampler.  Images as float32 within 2/255 (measured
  ~1e-6); with guidance off the UNet runs once per step on the batch (counted while sd-jax
  traces, and in diffusers' calls).
* The refiner in the PNG's A1111 ``parameters`` (``Refiner: NAME [HASH], Refiner switch at: 0.7``),
  read back by ``sd-jax generate --from-png`` (the same pixels), and ``--timestep-spacing``.
* SDXL prompt encoding with CLIP ViT-L (768 wide, 12 heads) and OpenCLIP bigG (1280 wide, 20
  heads, projection 1280) at their real widths, 2 layers each, against transformers (<= 1e-4),
  from their folders and from an SGM single file (bigG's fused ``in_proj`` split).

Compiled at LLVM -O0 (``_fast_compile``), as the CLI subprocess tests are.
"""
from __future__ import annotations

import hashlib
import sys

import jax
import numpy as np
import pytest

from test_sdxl_pipeline import build_tiny_sdxl
from tiny_models import nchw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 32            # the tiny VAE halves: 16x16 latents
PROMPT = "a small red circle at the top left on a blue background"
TOL = 2 / 255


def _one_device(monkeypatch):
    """Pipelines the CLI loads use one device (the batch is not padded to 8 fake devices)."""
    from sd_jax import sharding
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda devices=None: make_mesh(devices or jax.devices()[:1]))


def _load(folder, **kw):
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]), **kw)


def _noise(seed, k):
    """sd-jax's noise of step ``k`` for ``seed`` (pipeline._generate's ``noise_at``; 0: the initial latents)."""
    key = jax.random.fold_in(jax.random.key(np.uint32(seed)), k)
    return np.asarray(jax.random.normal(key, (SIZE // 2, SIZE // 2, 4)))[None]


def _feed_noise(monkeypatch, module, seed):
    """The scheduler module's ``randn_tensor`` returns sd-jax's noise of steps 1, 2, ...; returns the counter."""
    step = {"k": 0}

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        step["k"] += 1
        return nchw(_noise(seed, step["k"])).to(dtype or torch.float32)

    monkeypatch.setattr(sys.modules[module], "randn_tensor", randn)
    return step


def _count_unet_rows(monkeypatch) -> list:
    """Rows of each UNet call sd-jax traces from now on (a scan's body is traced once: one entry
    per UNet call in a step)."""
    from sd_jax import pipeline
    rows, real = [], pipeline.unet_denoiser

    def counting(unet, params, cond, residuals=None):
        fn = real(unet, params, cond, residuals)

        def model_fn(x, t, i):
            rows.append(x.shape[0])
            return fn(x, t, i)
        return model_fn

    monkeypatch.setattr(pipeline, "unet_denoiser", counting)
    return rows


def _count_ref_unet(monkeypatch, ref) -> list:
    rows, forward = [], ref.unet.forward

    def counted(sample, *a, **kw):
        rows.append(sample.shape[0])
        return forward(sample, *a, **kw)

    monkeypatch.setattr(ref.unet, "forward", counted)
    return rows


def _diff(ours, theirs) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    d = float(np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32)).max())
    print(f"max |diff| {d:.2e}")
    return d


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A tiny SDXL base folder (one ResNet and transformer layer per block: quick to compile), a
    Lightning-style UNet-only fp16 file of the same config (other weights) and an LCM-distilled
    UNet-only file (``time_cond_proj_dim``); the diffusers pipeline of the folder."""
    from diffusers import UNet2DConditionModel
    from sd_jax.weights.safetensors_io import save_file
    root = tmp_path_factory.mktemp("sdxl_more")
    folder = str(root / "base")
    ref = build_tiny_sdxl(folder, layers_per_block=1, transformer_layers_per_block=(1, 1))
    cfg = dict(ref.unet.config)
    files = {}
    for name, extra, seed in (("lightning", {}, 7), ("lcm", {"time_cond_proj_dim": 32}, 8)):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config({**cfg, **extra}).eval()
        with torch.no_grad():
            unet.conv_out.weight.mul_(0.1)
        sd = {k: v.detach().numpy().astype(np.float16 if name == "lightning" else np.float32)
              for k, v in unet.state_dict().items()}
        files[name] = str(root / f"{name}_unet.safetensors")
        save_file(sd, files[name])
    return folder, ref, files


def _ref_with_unet(ref, path, **config):
    """diffusers' pipeline with the UNet of a UNet-only file (as a Lightning user loads it)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from sd_jax.weights.safetensors_io import load_file
    unet = UNet2DConditionModel.from_config({**dict(ref.unet.config), **config}).eval()
    unet.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(path).items()})
    pipe = StableDiffusionXLPipeline(**{**ref.components, "unet": unet}, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(autouse=True)
def _fast_compile(monkeypatch):
    """LLVM -O0 for XLA:CPU, as tests/cli_helpers.py gives the CLI's subprocesses: about half the
    compile time of these tiny programs, the same arithmetic (no fast-math either way)."""
    real = jax.stages.Lowered.compile

    def compile(self, compiler_options=None, **kw):
        return real(self, {"xla_backend_optimization_level": 0, **(compiler_options or {})}, **kw)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile)


# ------------------------------------------------------------------ few-step models
@pytest.fixture(scope="module")
def lightning(xl):
    """The base model with the Lightning-style UNet-only file (``unet=``, as ``--unet FILE``), in
    sd-jax and in diffusers (the file's UNet loaded into the base pipeline)."""
    folder, ref, files = xl
    return _load(folder, unet=files["lightning"]), _ref_with_unet(ref, files["lightning"])


def test_lightning_unet_file_euler_trailing_matches_diffusers(lightning, monkeypatch):
    """SDXL-Lightning's model card: its UNet file into the base, ``EulerDiscreteScheduler.from_config(
    ..., timestep_spacing="trailing")``, guidance 0, 4 steps; sd-jax: ``scheduler="euler",
    timestep_spacing="trailing", guidance_scale=0``.  The UNet runs once per step on both sides
    (counted while sd-jax traces: one call on the one image)."""
    from diffusers import EulerDiscreteScheduler
    pipe, ref = lightning
    seed, steps = 3, 4
    rows = _count_unet_rows(monkeypatch)
    got = np.asarray(pipe(PROMPT, seed=seed, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE,
                          scheduler="euler", timestep_spacing="trailing", output_type="np"))
    assert rows == [1]
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    calls = _count_ref_unet(monkeypatch, ref)

    def reference():
        with torch.no_grad():
            return ref(PROMPT, latents=nchw(_noise(seed, 0)), num_inference_steps=steps, guidance_scale=0.0,
                       height=SIZE, width=SIZE, output_type="np").images

    want = reference()
    assert calls == [1] * steps
    assert _diff(got, want) <= TOL
    assert got.std() > 0.01
    # the spacing matters: leading timesteps give another image
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="leading")
    assert np.abs(reference() - want).max() > 0.02


def test_turbo_euler_ancestral_trailing_matches_diffusers(lightning, monkeypatch):
    """SDXL-Turbo's way: Euler ancestral at trailing timesteps, guidance 0, 2 steps; diffusers draws
    sd-jax's per-step noise.  Guidance 0 traces one UNet call on the batch per step; guidance 5
    (traced, not compiled) one on the doubled batch."""
    from diffusers import EulerAncestralDiscreteScheduler
    pipe, ref = lightning
    seed, steps = 5, 2
    rows = _count_unet_rows(monkeypatch)
    kw = dict(seed=seed, num_inference_steps=steps, height=SIZE, width=SIZE, scheduler="euler_a",
              timestep_spacing="trailing")
    got = np.asarray(pipe(PROMPT, guidance_scale=0.0, output_type="np", **kw))
    assert rows == [1]
    r, plan = pipe.resolve(pipe.requests(PROMPT, guidance_scale=0.0, **kw)[0])
    assert not plan.guidance and plan.sampler.config.timestep_spacing == "trailing"
    np.testing.assert_array_equal(plan.sampler.timesteps, [999, 499])
    rows.clear()
    pipe.lower(batch_size=1, height=SIZE, width=SIZE, num_inference_steps=steps, scheduler="euler_a",
               guidance_scale=5.0, output="latent")
    assert rows == [2]
    ref.scheduler = EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config, timestep_spacing="trailing")
    step = _feed_noise(monkeypatch, type(ref.scheduler).__module__, seed)
    with torch.no_grad():
        want = ref(PROMPT, latents=nchw(_noise(seed, 0)), num_inference_steps=steps, guidance_scale=0.0,
                   height=SIZE, width=SIZE, output_type="np").images
    assert step["k"] == steps
    assert _diff(got, want) <= TOL


def test_sdxl_lcm_unet_with_lcm_sampler_matches_diffusers(xl, monkeypatch):
    """An LCM-distilled SDXL UNet (``time_cond_proj_dim``, as latent-consistency/lcm-sdxl) given as a
    UNet-only file, ``scheduler="lcm"``, 4 steps, guidance 8 (an embedding, not classifier-free
    guidance: one UNet call per step), against diffusers' StableDiffusionXLPipeline with that UNet and
    ``LCMScheduler.from_config(pipe.scheduler.config)``, fed sd-jax's per-step noise."""
    from diffusers import LCMScheduler
    folder, ref, files = xl
    pipe = _load(folder, unet=files["lcm"])
    assert pipe.models.unet.config.time_cond_proj_dim == 32
    seed, steps, guidance = 9, 4, 8.0
    rows = _count_unet_rows(monkeypatch)
    got = np.asarray(pipe(PROMPT, seed=seed, num_inference_steps=steps, guidance_scale=guidance, height=SIZE,
                          width=SIZE, scheduler="lcm", output_type="np"))
    assert rows == [1]
    ref_pipe = _ref_with_unet(ref, files["lcm"], time_cond_proj_dim=32)
    ref_pipe.scheduler = LCMScheduler.from_config(ref_pipe.scheduler.config)
    step = _feed_noise(monkeypatch, type(ref_pipe.scheduler).__module__, seed)
    calls = _count_ref_unet(monkeypatch, ref_pipe)
    with torch.no_grad():
        want = ref_pipe(PROMPT, latents=nchw(_noise(seed, 0)), num_inference_steps=steps, guidance_scale=guidance,
                        height=SIZE, width=SIZE, output_type="np").images
    assert calls == [1] * steps and step["k"] == steps - 1
    assert _diff(got, want) <= TOL
    other = np.asarray(pipe(PROMPT, seed=seed, num_inference_steps=steps, guidance_scale=2.0, height=SIZE,
                            width=SIZE, scheduler="lcm", output_type="np"))
    assert np.abs(other - got).max() > 1e-3  # the guidance reaches the UNet


def test_timestep_spacing_is_checked(capsys, tmp_path):
    from sd_jax import cli
    from sd_jax.request import GenerationRequest, RequestError
    assert GenerationRequest("x", timestep_spacing="Trailing").timestep_spacing == "trailing"
    with pytest.raises(RequestError, match="timestep spacing 'karras' is not one of leading, trailing, linspace"):
        GenerationRequest("x", timestep_spacing="karras")
    with pytest.raises(SystemExit):
        cli.main(["generate", "x", "--timestep-spacing", "uniform", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sd-jax: error: ") and "--timestep-spacing" in err, err


# ------------------------------------------------------------------ the refiner in A1111 metadata
@pytest.fixture(scope="module")
def refiner_dir(tmp_path_factory):
    """The tiny SDXL refiner folder of test_sdxl_refiner."""
    from test_sdxl_refiner import build_tiny_refiner
    folder = str(tmp_path_factory.mktemp("refiner") / "my_refiner")
    build_tiny_refiner(folder)
    return folder


def test_refiner_in_a1111_parameters_and_pasted_back(xl, refiner_dir, tmp_path, monkeypatch, capsys):
    """``--refiner DIR --refiner-switch 0.7``: the PNG's parameters say ``Refiner: my_refiner, Refiner
    switch at: 0.7`` as A1111 writes them (a folder has no A1111 hash; a single file's title is
    ``NAME [HASH]``: the next test), read back by A1111's parser; the sd-jax JSON too;
    ``generate --from-png`` with the same models gives the same pixels (the switch, sampler,
    timestep spacing, steps, CFG, seed and size from the PNG).  ``--timestep-spacing trailing``
    reaches the sampler the CLI runs."""
    from PIL import Image
    from sd_jax import cli
    from sd_jax.images import read_metadata
    from sd_jax.request import Dispatcher
    from test_cli import parse_a1111
    folder = xl[0]
    monkeypatch.setenv("SD_JAX_CACHE", str(tmp_path / "xla"))
    _one_device(monkeypatch)
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    planned, plan_of = [], Dispatcher.plan
    monkeypatch.setattr(Dispatcher, "plan", lambda self, requests: planned.append(plan_of(self, requests)) or
                        planned[-1])
    title = "my_refiner"
    assert cli.main(["generate", PROMPT, "--negative", "blurry, dark", "--model", folder, "--refiner", refiner_dir,
                     "--refiner-switch", "0.7", "--steps", "5", "--guidance", "5", "--scheduler", "euler",
                     "--timestep-spacing", "trailing", "--seed", "4", "--size", f"{SIZE}x{SIZE}", "--no-progress",
                     "-o", a]) == 0
    params = Image.open(a).text["parameters"]
    assert f"Refiner: {title}, Refiner switch at: 0.7, Timestep spacing: trailing" in params, params
    fields = parse_a1111(params)
    assert (fields["Refiner"], fields["Refiner switch at"], fields["Sampler"]) == (title, "0.7", "Euler")
    meta = read_metadata(a)
    assert (meta["refiner"], meta["refiner_switch"], meta["timestep_spacing"]) == (title, 0.7, "trailing")
    (plan, _), = planned[0]  # what the CLI ran: the base's sampler at trailing timesteps, the switch at 0.7
    assert plan.base.sampler.config.timestep_spacing == "trailing"
    np.testing.assert_array_equal(plan.base.sampler.timesteps, [999, 799, 599, 399, 199])
    assert (plan.base.end, plan.refiner.start) == (4, 4)  # diffusers' rule at 0.7: the base takes t >= 300
    capsys.readouterr()
    assert cli.main(["generate", "--from-png", a, "--model", folder, "--refiner", refiner_dir, "--no-progress",
                     "-o", b]) == 0
    assert "warning" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(b)), np.asarray(Image.open(a)))
    assert Image.open(b).text["parameters"] == params
    assert np.asarray(Image.open(a)).std() > 2


def _png_args(png, *extra):
    from sd_jax import cli
    return cli.build_parser().parse_args(["generate", "--from-png", png, *extra])


def test_from_png_settings_options_win_and_refiner_warnings(tmp_path, capsys):
    """A single file's A1111 title ``NAME [HASH]``; what ``--from-png`` takes from an A1111 infotext (A1111's own, with a Karras sampler and its
    Clip skip numbering), that options given win over it, and the warnings for a refiner the
    command line does not give or another one than the PNG names."""
    from PIL import Image, PngImagePlugin
    from sd_jax import cli, commands, infotext
    png = str(tmp_path / "a1111.png")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", 'a castle, (moat:1.2)\nNegative prompt: fog\nSteps: 12, Sampler: DPM++ 2M, '
                                'Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 48x32, Model hash: 31e35c80fc, '
                                'Model: sd_xl_base_1.0, Clip skip: 2, Refiner: sd_xl_refiner_1.0 [7440042bbd], '
                                'Refiner switch at: 0.75, Version: v1.10.1')
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    args = _png_args(png, "--model", str(tmp_path))
    found = commands.png_defaults(args)
    err = capsys.readouterr().err
    assert "made with the refiner sd_xl_refiner_1.0 [7440042bbd]; give it with --refiner PATH" in err
    assert "made with the model sd_xl_base_1.0" in err
    assert found == {"prompt": "a castle, (moat:1.2)", "negative": "fog", "steps": 12, "guidance": 6.5, "seed": 42,
                     "size": (48, 32), "scheduler": "dpmpp_2m_karras", "clip_skip": 1}
    refiner = tmp_path / "sd_xl_refiner_1.0.safetensors"
    refiner.write_bytes(b"not the same file")
    assert infotext.checkpoint_title(str(refiner)) == \
        f"sd_xl_refiner_1.0 [{hashlib.sha256(b'not the same file').hexdigest()[:10]}]"  # A1111's shorthash
    assert infotext.checkpoint_title(str(tmp_path)) == tmp_path.name  # a folder: its name
    args = _png_args(png, "--refiner", str(refiner), "--steps", "3")
    found = commands.png_defaults(args)
    assert found["refiner_switch"] == 0.75
    assert "made with the refiner sd_xl_refiner_1.0 [7440042bbd], --refiner is sd_xl_refiner_1.0 [" \
        in capsys.readouterr().err
    again = cli.build_parser(found).parse_args(["generate", "--from-png", png, "--steps", "3", "--seed", "1"])
    assert (again.prompt, again.steps, again.seed, again.refiner_switch, again.size) == \
        ("a castle, (moat:1.2)", 3, 1, 0.75, (48, 32))
    assert cli.main(["generate", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give a prompt" in err and "--from-png" in err
    assert cli.main(["generate", "--from-png", str(tmp_path / "none.png"), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sd-jax: error: --from-png") and "not a readable image" in err


def test_batch_pngs_name_the_refiner_and_spacing(tmp_path):
    """``sd-jax batch --refiner R --timestep-spacing trailing``: each row's request has the spacing,
    each PNG and manifest entry the refiner's A1111 fields (a fake
    ensemble: test_batch's fake pipeline with the ensemble's ``metadata``)."""
    import json
    from PIL import Image
    from sd_jax import batch
    from test_batch import DEFAULTS, FakePipe

    class FakeEnsemble(FakePipe):
        metadata = {"refiner": "sd_xl_refiner_1.0 [7440042bbd]", "refiner_switch": 0.75}

    rows = batch.make_rows([(1, {"prompt": "a"}), (2, {"prompt": "b"})],
                           {**DEFAULTS, "timestep_spacing": "trailing"}, "p.txt")
    assert [r.request().timestep_spacing for r in rows] == ["trailing"] * 2  # (job-wide: one group still)
    batch.run(FakeEnsemble(), rows, str(tmp_path), progress=False)
    for r in rows:
        params = Image.open(tmp_path / r.name).text["parameters"]
        assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.75, Timestep spacing: trailing" in params
    entry = json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[0])
    assert (entry["refiner"], entry["refiner_switch"], entry["timestep_spacing"]) == \
        ("sd_xl_refiner_1.0 [7440042bbd]", 0.75, "trailing")


# ------------------------------------------------------------------ text encoders at their real widths
def _sgm_text_encoders(te, te2) -> dict:
    """The two encoders under the SGM single-file names, written here from the layout itself
    (not by sd-jax): CLIP ViT-L with transformers' names under ``conditioner.embedders.0.transformer.``,
    OpenCLIP bigG under ``conditioner.embedders.1.model.`` with q/k/v fused into ``in_proj_*`` and
    ``text_projection`` as the matrix P of ``x @ P``."""
    out = {}
    for k, v in te.state_dict().items():
        if not k.endswith("position_ids"):
            out["conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = \
                v.numpy()
    sd = {k.removeprefix("text_model."): v.numpy() for k, v in te2.state_dict().items()}
    p = "conditioner.embedders.1.model."
    out[p + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    for w in ("weight", "bias"):
        out[p + "ln_final." + w] = sd["final_layer_norm." + w]
    out[p + "text_projection"] = np.ascontiguousarray(sd["text_projection.weight"].T)
    out[p + "logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    for i in range(te2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[dst + "attn.in_proj_" + w] = np.concatenate([sd[f"{src}self_attn.{n}_proj.{w}"] for n in "qkv"])
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{a}.{w}"] = sd[f"{src}{b}.{w}"]
    return out


def test_sdxl_prompt_encoding_at_real_text_encoder_widths(tmp_path):
    """CLIP ViT-L (768 wide, 12 heads, MLP 3072, quick-GELU) and OpenCLIP bigG (1280 wide, 20 heads,
    MLP 5120, GELU, projection 1280), 2 layers each, a small vocabulary: SDXL's prompt embeddings
    (both penultimate states, 2048 wide) and pooled embedding against diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` (transformers' encoders), <= 1e-4 (measured 4e-6),
    read (a) from the encoders' transformers folders and (b) from an SGM single file
    (bigG's fused ``in_proj`` split, ``text_projection`` transposed; sd-jax's own export writes
    the same keys and values)."""
    import jax.numpy as jnp
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from sd_jax import families
    from sd_jax.models import clip
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig
    from sd_jax.weights import loader
    from sd_jax.weights import single_file as sf
    from sd_jax.weights.safetensors_io import save_file
    from test_sdxl_pipeline import _tokenizer
    torch.manual_seed(0)
    tok, vocab = _tokenizer(str(tmp_path / "tok"))
    tok2, _ = _tokenizer(str(tmp_path / "tok2"), pad="!")
    common = dict(vocab_size=vocab, max_position_embeddings=77, num_hidden_layers=2, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                      hidden_act="quick_gelu", pad_token_id=tok.eos_token_id, **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                     projection_dim=1280, hidden_act="gelu", pad_token_id=0,
                                                     **common)).eval()
    ref = StableDiffusionXLPipeline(vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                    unet=None, scheduler=None, add_watermarker=False)
    prompts = ["a small red circle at the top left on a blue background", "a green square"]
    ids = tuple(np.asarray(t(prompts, padding="max_length", max_length=77, truncation=True).input_ids, np.int32)
                for t in (tok, tok2))
    with torch.no_grad():
        pe, _, pooled, _ = ref.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
    assert pe.shape == (2, 77, 2048) and pooled.shape == (2, 1280)

    def check(models, params, what):
        ctx, pool = families.SDXL.prompt.encode(models, params, ids)
        for ours, theirs in ((ctx, pe), (pool, pooled)):
            assert _diff(ours, theirs.numpy()) <= 1e-4, what

    # (a) the encoders' folders, as a diffusers SDXL folder holds them
    import types
    te.save_pretrained(tmp_path / "text_encoder")
    te2.save_pretrained(tmp_path / "text_encoder_2")
    (m1, p1), (m2, p2) = (clip.load(tmp_path / n, dtype=jnp.float32) for n in ("text_encoder", "text_encoder_2"))
    assert (m1.config.num_attention_heads, m2.config.num_attention_heads, m2.config.projection_dim) == (12, 20, 1280)
    check(types.SimpleNamespace(text_encoder=m1, text_encoder_2=m2), {"text_encoder": p1, "text_encoder_2": p2},
          "folders")
    del p1, p2

    # (b) an SGM single file: a tiny UNet (2048-wide cross-attention, 1280-wide pooled input) and VAE around them
    ucfg = UNetConfig.tiny_sdxl(cross_attention_dim=2048, projection_class_embeddings_input_dim=1280 + 6 * 8,
                                layers_per_block=1, transformer_layers_per_block=(1, 1)).to_dict()
    vcfg = VAEConfig.tiny().to_dict()
    unet = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")})
    vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")})
    sds = {n: {k: v.detach().numpy() for k, v in m.state_dict().items() if not k.endswith("position_ids")}
           for n, m in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2))}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te.config.to_dict(),
               "text_encoder_2": te2.config.to_dict()}
    sgm = _sgm_text_encoders(te, te2)
    exported = sf.to_single_file(configs, sds)
    for k, v in sgm.items():  # sd-jax's export writes the layout as it is
        np.testing.assert_array_equal(exported[k], v, err_msg=k)
    assert {k for k in exported if k.startswith("conditioner.")} == set(sgm)
    path = str(tmp_path / "sdxl.safetensors")
    save_file({**{k: v for k, v in exported.items() if not k.startswith("conditioner.")}, **sgm}, path)
    del exported, sds
    m = loader.load(path)
    assert m.family is families.SDXL
    assert (m.models.text_encoder.config.num_attention_heads, m.models.text_encoder_2.config.num_attention_heads) == \
        (12, 20)
    check(m.models, m.params, "single file")
