"""The safety checker against diffusers' StableDiffusionSafetyChecker (PyTorch, float32, a tiny
random CLIP tower saved by diffusers with transformers 5).

Images are 30x30 uint8 at the checker's image_size, so the preprocessing is bit-equal to
CLIPImageProcessor's (tests/test_clip_vision.py) and the only difference is float error in
the tower (<= 1e-6): the scores, which diffusers rounds to 3 decimals, are equal (to 1e-6: JAX's round may
differ in the last float32 bit), or one
rounding step (0.001) apart when a value lies within float error of a rounding boundary; the
flags are equal.  Images are made flagged by construction: concept embeddings are set to the
projected embeddings of given images, with thresholds 0.005 either side of their cosine.
"""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers.pipelines.stable_diffusion import safety_checker as sc_module
from safetensors.torch import load_file, save_file

from sd_jax.models import safety_checker as sc
from sd_jax.weights.safetensors_io import CheckpointError

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=6)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            bos_token_id=0, eos_token_id=2, pad_token_id=1)


def processor(size=30, crop=30):
    return transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})


def clip_input(images, size=30):
    return torch.tensor(processor(size)(list(images), return_tensors="np")["pixel_values"])


def build_checker(folder, images=None, seed=0, size=30):
    """Save a tiny random StableDiffusionSafetyChecker (+ feature_extractor/) under ``folder``.

    With ``images`` (>= 2): concept 3 is image 0's embedding (threshold 0.995: image 0 is
    flagged outright); special-care concepts 1 and 2 and concept 5 are image 1's (thresholds
    0.995, 1.005, 1.005): image 1 is flagged only through the 0.01 special-care adjustment,
    which also lifts its special-care score 2.  Other concepts are random directions with
    threshold 0.9 (not reached).  Returns the torch checker."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model = sc_module.StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(17, 24))
        model.special_care_embeds.copy_(torch.randn(3, 24))
        model.concept_embeds_weights.fill_(0.9)
        model.special_care_embeds_weights.fill_(0.9)
        if images is not None:
            e = model.visual_projection(model.vision_model(clip_input(images[:2], size))[1])
            model.concept_embeds[3] = e[0]
            model.concept_embeds_weights[3] = 0.995
            model.special_care_embeds[1] = e[1]
            model.special_care_embeds_weights[1] = 0.995
            model.special_care_embeds[2] = e[1]
            model.special_care_embeds_weights[2] = 1.005
            model.concept_embeds[5] = e[1]
            model.concept_embeds_weights[5] = 1.005
    model.save_pretrained(os.path.join(folder, "safety_checker"))
    processor(size).save_pretrained(os.path.join(folder, "feature_extractor"))
    return model


def diffusers_check(model, images, monkeypatch):
    """diffusers' forward: (flags, special scores [B, 3], concept scores [B, 17]), the scores
    read from its own rounding (its module's ``round``, patched to record)."""
    seen = []

    def record(x, n):
        seen.append(round(float(x), n))
        return round(x, n)
    monkeypatch.setattr(sc_module, "round", record, raising=False)
    _, flags = model(clip_input=clip_input(images), images=np.zeros((len(images), 1), np.float32))
    monkeypatch.undo()
    s = np.asarray(seen, np.float32).reshape(len(images), 20)
    return np.asarray(flags), s[:, :3], s[:, 3:]


@pytest.fixture(scope="module")
def images():
    rs = np.random.RandomState(0)
    imgs = rs.randint(0, 256, (6, 30, 30, 3)).astype(np.uint8)
    imgs[4] = 200  # a flat image
    return imgs


@pytest.fixture(scope="module")
def checker(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("sd")
    return build_checker(folder, images), folder


def test_scores_and_flags_equal_diffusers(checker, images, monkeypatch):
    model, folder = checker
    flags, special, concept = diffusers_check(model, images, monkeypatch)
    assert flags.tolist() == [True, True, False, False, False, False]   # by construction
    assert special[1, 2] > 0 and concept[1, 5] > 0                      # the adjustment's doing
    ours, params = sc.load(folder)
    got = jax.jit(ours.scores)(params, images)
    assert np.asarray(got["nsfw"]).tolist() == flags.tolist()
    assert np.abs(np.asarray(got["special_scores"]) - special).max() <= 1e-3 + 1e-6
    assert np.abs(np.asarray(got["concept_scores"]) - concept).max() <= 1e-3 + 1e-6
    # equal up to the last float32 bit of the division by 1000, where not one step apart
    assert np.isclose(np.asarray(got["concept_scores"]), concept, rtol=0, atol=1e-6).mean() > 0.95


def test_random_concepts_flag_as_diffusers(tmp_path, images, monkeypatch):
    """Random concept directions with thresholds drawn around the cosines: a mix of flags."""
    model = build_checker(tmp_path, seed=1)
    with torch.no_grad():
        e = torch.nn.functional.normalize(model.visual_projection(model.vision_model(clip_input(images))[1]))
        cos = e @ torch.nn.functional.normalize(model.concept_embeds).T
        model.concept_embeds_weights.copy_(cos.max(0).values - 0.02)
        model.special_care_embeds_weights.fill_(-1.0)     # every image gets the special-care adjustment
    model.save_pretrained(tmp_path / "safety_checker")
    flags, _, concept = diffusers_check(model, images, monkeypatch)
    ours, params = sc.load(tmp_path)
    got = jax.jit(ours.scores)(params, images)
    assert 0 < flags.sum() <= len(images)
    assert np.asarray(got["nsfw"]).tolist() == flags.tolist()
    assert np.abs(np.asarray(got["concept_scores"]) - concept).max() <= 1e-3 + 1e-6


def test_actions(checker, images):
    _, folder = checker
    ours, params = sc.load(folder)

    @jax.jit        # one compilation for the three actions and a float32 input
    def run(params, x):
        each = [sc.SafetyChecker(ours.vision, ours.preprocess, a)(params, x) for a in sc.ACTIONS]
        return each + [ours(params, x.astype(np.float32) / 255)]
    (out, nsfw), (blurred, _), (kept, nsfw_kept), (f_out, f_nsfw) = jax.tree.map(np.asarray, run(params, images))
    assert nsfw.tolist() == [True, True, False, False, False, False]
    assert (out[:2] == 0).all() and (out[2:] == images[2:]).all()
    assert blurred.dtype == np.uint8 and (blurred[2:] == images[2:]).all()
    # a blurred image keeps its mean colour but loses its pixel-to-pixel detail
    assert np.abs(blurred[:2].astype(float).mean((1, 2)) - images[:2].mean((1, 2))).max() < 3
    assert np.abs(np.diff(blurred[:2].astype(float), axis=1)).mean() < 0.2 * np.abs(
        np.diff(images[:2].astype(float), axis=1)).mean()
    assert (kept == images).all() and nsfw_kept.tolist() == nsfw.tolist()
    # float32 images in [0, 1] are checked as their uint8 rounding
    assert f_nsfw.tolist() == nsfw.tolist() and (f_out[:2] == 0).all() and f_out.dtype == np.float32
    with pytest.raises(ValueError, match="safety policy 'red'"):
        sc.SafetyChecker(ours.vision, ours.preprocess, "red")


def test_present(tmp_path, checker):
    _, folder = checker
    assert sc.present(folder) and not sc.present(tmp_path)
    (tmp_path / "safety_checker").mkdir()
    (tmp_path / "safety_checker" / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text(json.dumps({"safety_checker": [None, None]}))
    assert not sc.present(tmp_path)


def test_wrong_projection_size(tmp_path, checker):
    """A safety_checker/config.json whose projection_dim does not match the weights."""
    _, folder = checker
    for sub in ("safety_checker", "feature_extractor"):
        os.makedirs(tmp_path / sub)
        for f in os.listdir(folder / sub):
            (tmp_path / sub / f).write_bytes((folder / sub / f).read_bytes())
    cfg_path = tmp_path / "safety_checker" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"visual_projection\.weight has shape \(24, 32\).*projection_dim=16") as e:
        sc.load(tmp_path)
    assert "\n" not in str(e.value)
    # concept embeddings of another width than the projection
    cfg["projection_dim"] = 24
    cfg_path.write_text(json.dumps(cfg))
    path = tmp_path / "safety_checker" / "model.safetensors"
    sd = load_file(path)
    sd["concept_embeds"] = torch.zeros(17, 16)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"concept_embeds has shape \(17, 16\).*24 wide"):
        sc.load(tmp_path)
    os.remove(tmp_path / "feature_extractor" / "preprocessor_config.json")
    with pytest.raises(CheckpointError, match="no feature_extractor.*--no-safety-checker"):
        sc.load(tmp_path)


# ---- in the pipeline -------------------------------------------------------------------

STEPS, SIZE = 3, 32      # the tiny pipeline's 32x32 images: the checker sees a 30x30 centre crop


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A tiny SD1 folder with a tiny safety checker made to flag two of four generated images
    (see build_checker), and diffusers' pipeline loaded from it with the checker."""
    import diffusers
    from tiny_models import build_tiny_pipeline, nchw
    folder = tmp_path_factory.mktemp("sd_safety")
    ref = build_tiny_pipeline(str(folder))
    lat = np.random.RandomState(0).randn(4, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    kw = dict(prompt=["a red circle", "a blue square", "a green circle", "shapes"], num_inference_steps=STEPS,
              guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np")
    with torch.no_grad():
        plain = ref(latents=nchw(lat), **kw).images
    build_checker(folder, np.round(plain * 255).astype(np.uint8), size=SIZE)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    checked = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    checked.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = checked(latents=nchw(lat), **kw)
    return folder, lat, kw, plain, out


def test_pipeline_flags_equal_diffusers(pipelines):
    from sd_jax.pipeline import StableDiffusionPipeline
    folder, lat, kw, plain, ref = pipelines
    assert ref.nsfw_content_detected == [True, True, False, False]     # by construction
    from sd_jax import sharding
    # one device: compiles in about half the time of the session's 8 (sharding: test_score)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), mesh=sharding.make_mesh(jax.devices()[:1]))
    assert pipe.safety_checker is not None
    args = dict(latents=lat, num_inference_steps=STEPS, height=SIZE, width=SIZE, scheduler="ddim")
    got = pipe(kw["prompt"], output_type="np", **args)
    assert got.nsfw_content_detected == ref.nsfw_content_detected
    assert np.abs(got - ref.images).max() <= 5e-6           # flagged ones black on both sides
    assert (got[:2] == 0).all() and np.abs(got[2:] - plain[2:]).max() <= 5e-6
    # (the other policies, on the same checker outside the pipeline: test_actions; one
    # compilation of the pipeline is the test's cost)
    pipe.safety_policy = "pink"
    with pytest.raises(ValueError, match="safety policy 'pink'"):
        pipe(kw["prompt"], output_type="np", **args)
    assert StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=False).safety_checker is None


def no_persistent_cache(monkeypatch):
    """The CLI turns on JAX's persistent compilation cache process-wide; not in the test session."""
    import sd_jax.pipeline
    monkeypatch.setattr(sd_jax.pipeline, "enable_compilation_cache", lambda *a: None)


def test_batch_records_flags(pipelines, tmp_path, capsys, monkeypatch):
    """``sd-jax batch`` (in process): each image's flag in the manifest and in its PNG
    metadata, equal to the checker's verdict on the written image (``--safety-policy keep``
    writes the image the checker saw); ``--score-with``: the CLIP scores of the written images."""
    from sd_jax import cli
    from sd_jax.images import read_metadata
    from sd_jax.score import ClipScorer
    from test_score import build_clip
    folder = pipelines[0]
    no_persistent_cache(monkeypatch)
    build_clip(tmp_path / "clip")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    assert cli.main(["batch", str(prompts), "--out", str(out), "--model", str(folder), "--size", "32x32",
                     "--steps", "2", "--safety-policy", "keep", "--no-progress",
                     "--score-with", str(tmp_path / "clip")]) == 0
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    from PIL import Image
    written = np.stack([np.asarray(Image.open(out / e["file"])) for e in entries])
    checker, params = sc.load(folder)
    want = np.asarray(jax.jit(checker.scores)(params, written)["nsfw"]).tolist()
    assert [e["nsfw_content_detected"] for e in entries] == want
    assert [read_metadata(out / e["file"])["nsfw_content_detected"] for e in entries] == want
    scores = [json.loads(line) for line in (out / "clip_scores.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"]) for r in scores] == [(e["file"], e["prompt"]) for e in entries]
    ref = ClipScorer.load(tmp_path / "clip").score(written, [e["prompt"] for e in entries])
    assert np.abs(np.asarray([r["clip_score"] for r in scores]) - ref).max() <= 1e-4
    assert "CLIP score: " in capsys.readouterr().err


def test_no_safety_checker_notice(pipelines, capsys, monkeypatch):
    from sd_jax import cli, commands
    no_persistent_cache(monkeypatch)
    args = cli.build_parser().parse_args(["generate", "x", "--model", str(pipelines[0]), "--no-safety-checker"])
    assert commands.load(args).safety_checker is None
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["sd-jax: note: the model's safety checker is off (--no-safety-checker): images are not "
                   "checked for NSFW content"]
    args = cli.build_parser().parse_args(["generate", "x", "--safety-policy", "blur"])
    assert (args.no_safety_checker, args.safety_policy) == (False, "blur")
