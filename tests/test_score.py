"""CLIP scoring against torchmetrics' CLIPScore (PyTorch, float32) on the same tiny random
transformers CLIPModel and images.

Images are 32x32 uint8 with a preprocessor that centre-crops 30 px without resizing, so the
preprocessing is bit-equal and only float error differs: scores (0..100) within 1e-3
(measured ~1e-5).
"""
import json
import os

import numpy as np
import pytest
import torch
import transformers

from sd_jax.score import ClipScorer, mean_ci, prompts_of_folder

PROMPTS = ["a red circle", "a blue square on green", "two yellow triangles", "shapes", "a circle", "grey"]
ATOL = 1e-3


def build_clip(folder):
    """Save a tiny random transformers CLIPModel, its tokenizer and a preprocessor (32 px,
    centre crop 30) in ``folder``; returns (the model, a CLIPProcessor)."""
    from sd_jax.data.tokenizer import write_tokenizer
    tok_dir = folder / "_tok"
    vocab = write_tokenizer(str(tok_dir))
    tok = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=30, patch_size=6), projection_dim=24)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 30, "width": 30})
    proc.save_pretrained(folder)
    return model, transformers.CLIPProcessor(image_processor=proc, tokenizer=tok)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return (folder, *build_clip(folder))


@pytest.fixture(scope="module")
def scorer(clip_dir):
    return ClipScorer.load(clip_dir[0])


def images(n=6, seed=0):
    x = np.random.RandomState(seed).randint(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    x[n // 2] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None]     # a smooth gradient
    return x


class Features(torch.nn.Module):
    """The CLIPModel as torchmetrics calls it: transformers 5's ``get_*_features`` return an
    output object whose ``pooler_output`` is the projected embedding (torchmetrics expects
    the tensor itself)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_scores_equal_torchmetrics(clip_dir, scorer):
    from torchmetrics.multimodal.clip_score import CLIPScore
    folder, model, processor = clip_dir
    x = images()
    metric = CLIPScore(model_name_or_path=lambda: (Features(model), processor))
    want = []
    for img, prompt in zip(x, PROMPTS):     # one pair at a time: CLIPScore averages what it is given
        metric.reset()
        metric.update(torch.from_numpy(img.transpose(2, 0, 1).copy()), prompt)
        want.append(float(metric.compute()))
    got = scorer.score(x, PROMPTS)
    assert got.shape == (6,) and got.dtype == np.float32
    assert np.abs(got - np.asarray(want)).max() <= ATOL, (got, want)
    assert (got > 0).any() and len(set(np.round(got, 3))) > 2     # a spread, not all clamped


def test_mean_ci():
    m, h = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and abs(h - 1.96 * np.std([1, 2, 3, 4], ddof=1) / 2) < 1e-12
    assert np.isnan(mean_ci([5.0])[1])


def test_cli_score(clip_dir, scorer, tmp_path, capsys):
    """``sd-jax score`` in process: prompts from PNG metadata, then from a manifest; the table
    holds the Python API's scores."""
    from PIL import Image

    from sd_jax import cli
    from sd_jax.images import save_png
    folder = clip_dir[0]
    x = images(3, seed=1)
    prompts = ["a red circle\nwith a second line", "a blue square", "grey"]
    out = tmp_path / "imgs"
    for i, (img, p) in enumerate(zip(x, prompts)):
        save_png(str(out / f"{i}.png"), img, {"prompt": p, "negative_prompt": "blurry", "steps": 2, "seed": i})
    assert [p for _, p in prompts_of_folder(str(out))] == prompts
    assert cli.main(["score", str(out), "--clip", str(folder), "--out", str(tmp_path / "s.csv")]) == 0
    printed = capsys.readouterr().out
    want = scorer.score(x, prompts)
    import csv
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["prompt"] for r in rows] == prompts
    assert np.abs(np.asarray([float(r["clip_score"]) for r in rows]) - want).max() <= 1e-4
    assert f"CLIP score: {want.mean():.2f} ± " in printed and "over 3 image(s)" in printed
    # a manifest wins over the metadata, and lists only its own entries
    (out / "manifest.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "prompt": p}) + "\n"
                                                for i, p in [(0, "grey"), (2, "a red circle")]))
    Image.fromarray(x[0]).save(out / "extra.png")
    assert cli.main(["score", str(out), "--clip", str(folder), "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert [(r["file"], r["prompt"]) for r in rows] == [("0.png", "grey"), ("2.png", "a red circle")]
    want = scorer.score(x[[0, 2]], ["grey", "a red circle"])
    assert np.abs(np.asarray([r["clip_score"] for r in rows]) - want).max() <= 1e-4


def _one_error_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sd-jax: error: "), lines
    return lines[0]


def test_errors(clip_dir, tmp_path, capsys):
    from PIL import Image

    from sd_jax import cli
    folder = clip_dir[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(images(1)[0]).save(bare / "a.png")          # no metadata, no manifest
    assert cli.main(["score", str(bare), "--clip", str(folder)]) == 2
    assert "no manifest.jsonl and a.png has no prompt in its PNG metadata" in _one_error_line(capsys)
    text_only = tmp_path / "text_only"
    clip_dir[1].text_model.save_pretrained(text_only)      # a CLIPTextModel: no vision model
    capsys.readouterr()                                     # (its progress bar)
    meta = tmp_path / "meta"
    from sd_jax.images import save_png
    save_png(str(meta / "a.png"), images(1)[0], {"prompt": "x"})
    assert cli.main(["score", str(meta), "--clip", str(text_only)]) == 2
    assert "not a full CLIP model" in _one_error_line(capsys)
    vision_only = tmp_path / "vision_only"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("vision_config")
    os.makedirs(vision_only)
    (vision_only / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["score", str(meta), "--clip", str(vision_only)]) == 2
    assert "text and a vision model" in _one_error_line(capsys)
    assert cli.main(["score", str(meta), "--clip", str(folder), "--out", str(tmp_path / "s.txt")]) == 2
    assert ".csv or .jsonl" in _one_error_line(capsys)


def test_sharded_equals_one_device(clip_dir, tmp_path):
    """Over the test session's 8 fake CPU devices (conftest): CLIP scores and safety flags
    equal one device's."""
    import jax

    from sd_jax import sharding
    from sd_jax.models import safety_checker as sc
    from test_safety_checker import build_checker
    x = images(8, seed=2)
    build_checker(tmp_path, x, size=32)      # flags images 0 and 1 by construction
    one, eight = sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh()
    assert eight.devices.size == 8
    prompts = ["a red circle", "a blue square", "grey", "shapes"] * 2
    s1, s8 = (ClipScorer.load(clip_dir[0], mesh=m).score(x, prompts) for m in (one, eight))
    assert np.abs(s1 - s8).max() <= 1e-4
    checker, params = sc.load(tmp_path)
    r1, r8 = (jax.jit(checker.scores)(sharding.replicate(params, m), sharding.shard_batch(x, m)) for m in (one, eight))
    assert len(r8["nsfw"].sharding.device_set) == 8
    assert np.asarray(r1["nsfw"]).tolist() == np.asarray(r8["nsfw"]).tolist()
    assert np.asarray(r1["nsfw"]).tolist()[:3] == [True, True, False]
    assert np.abs(np.asarray(r1["concept_scores"]) - np.asarray(r8["concept_scores"])).max() <= 1e-3 + 1e-6
