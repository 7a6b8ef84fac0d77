"""Tests for the synthetic dataset, tokenizer files, evaluator and training data loading."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd_jax.data import evaluator, shapes, tokenizer
from sd_jax.train import data as tdata

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIELDS = ("color", "shape", "size", "position")


# ----------------------------------------------------------------- dataset


def test_sample_is_deterministic_and_order_independent():
    a_img, a_cap, a_lab = shapes.sample(3, 17)
    for i in range(5):  # unrelated calls in between change nothing
        shapes.sample(99, i)
    b_img, b_cap, b_lab = shapes.sample(3, 17)
    assert a_img.dtype == np.uint8 and a_img.shape == (64, 64, 3)
    np.testing.assert_array_equal(a_img, b_img)
    assert (a_cap, a_lab) == (b_cap, b_lab)

    imgs = [shapes.sample(3, i)[0] for i in range(20)]
    assert len({im.tobytes() for im in imgs}) == 20  # different index -> different
    other = [shapes.sample(4, i)[0] for i in range(20)]
    assert all(not np.array_equal(x, y) for x, y in zip(imgs, other))  # different seed

    big = shapes.sample(3, 17, size=128)[0]
    assert big.shape == (128, 128, 3)


def test_batch_matches_sample():
    images, captions = shapes.batch(5, 10, 4, size=32, split="heldout")
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    for k in range(4):
        img, cap, _ = shapes.sample(5, 10 + k, size=32, split="heldout")
        np.testing.assert_array_equal(images[k], img)
        assert captions[k] == cap


@pytest.mark.parametrize("max_shapes", [1, 2])
def test_splits_respect_held_out_combos(max_shapes):
    held = set(shapes.HELD_OUT)
    assert len(held) >= 4
    seen_train, seen_all = set(), set()
    for i in range(1500):
        lab = shapes.sample(11, i, size=16, max_shapes=max_shapes)[2]
        combos = {(o["color"], o["shape"]) for o in lab["objects"]}
        assert not combos & held, (i, combos)
        assert lab["background"] not in {o["color"] for o in lab["objects"]}
        seen_train |= combos
    for i in range(300):
        lab = shapes.sample(11, i, size=16, split="heldout", max_shapes=max_shapes)[2]
        assert {(o["color"], o["shape"]) for o in lab["objects"]} <= held
        lab = shapes.sample(11, i, size=16, split="all", max_shapes=max_shapes)[2]
        seen_all |= {(o["color"], o["shape"]) for o in lab["objects"]}
    # train covers every other combination; "all" reaches the held-out ones too
    assert seen_train == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES} - held
    assert held <= seen_all
    with pytest.raises(ValueError, match="split"):
        shapes.sample(0, 0, split="test")


def test_dataset_contents():
    assert len(shapes.COLORS) >= 6 and set(shapes.SHAPES) >= {"circle", "square", "triangle"}
    rgb = np.array(list(shapes.COLORS.values()), float)
    dist = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(len(rgb)) * 1e9
    assert dist.min() > 100  # named colours are far apart
    counts = {k: set() for k in FIELDS}
    n_objects = set()
    for i in range(400):
        lab = shapes.sample(2, i, size=16, max_shapes=2)[2]
        n_objects.add(len(lab["objects"]))
        for o in lab["objects"]:
            for k in FIELDS:
                counts[k].add(o[k])
    assert counts["position"] == set(shapes.POSITIONS)
    assert counts["size"] == set(shapes.SIZES)
    assert n_objects == {1, 2}
    assert all(len(shapes.sample(2, i, size=16)[2]["objects"]) == 1 for i in range(50))


@pytest.mark.parametrize("max_shapes", [1, 2])
def test_captions_parse_back_to_labels(max_shapes):
    vocab = set(shapes.vocabulary())
    styles = set()
    for i in range(400):
        _, cap, lab = shapes.sample(21, i, size=16, split="all", max_shapes=max_shapes)
        assert cap == shapes.caption_for(lab)
        assert set(cap.replace(",", " ").split()) <= vocab
        parsed = shapes.parse_prompt(cap)
        assert parsed["background"] == (lab["background"] if lab["mention_background"] else None), cap
        assert len(parsed["objects"]) == len(lab["objects"]), cap
        for want, got in zip(lab["objects"], parsed["objects"]):
            assert got["color"] == want["color"] and got["shape"] == want["shape"], cap
            assert got["size"] == (want["size"] if lab["mention_size"] else None), cap
            assert got["position"] == (want["position"] if lab["mention_position"] else None), cap
        for k in FIELDS:
            assert parsed[k] == parsed["objects"][0][k]
        styles.add((lab["template"], lab["mention_size"], lab["mention_position"], lab["mention_background"]))
    assert len(styles) >= 12  # phrasing varies


def test_caption_for_and_parse_prompt_variants():
    lab = {"color": "red", "shape": "circle", "size": "small", "position": "top left", "background": "blue"}
    assert shapes.caption_for(lab) == "a small red circle at the top left on a blue background"
    lab2 = {**lab, "color": "orange", "mention_size": False, "mention_position": False}
    assert shapes.caption_for(lab2) == "an orange circle on a blue background"
    assert "an orange background" in shapes.caption_for({**lab, "background": "orange"})
    p = shapes.parse_prompt("A big Purple triangle in the upper right corner, on a green background.")
    assert {k: p[k] for k in (*FIELDS, "background")} == {
        "color": "purple", "shape": "triangle", "size": "large", "position": "top right", "background": "green"}
    p = shapes.parse_prompt("a white background with a tiny black square in the middle")
    assert (p["color"], p["shape"], p["size"], p["position"], p["background"]) == (
        "black", "square", "small", "center", "white")
    p = shapes.parse_prompt("a cat")
    assert all(p[k] is None for k in (*FIELDS, "background")) and p["objects"] == []


# ----------------------------------------------------------------- tokenizer


def test_vocab_layout():
    vocab, merges = tokenizer.build_vocab()
    n = tokenizer.vocab_size()
    assert n == len(vocab) < 2000
    ids = sorted(vocab.values())
    assert ids == list(range(n))
    assert vocab[tokenizer.BOS] == n - 2 and vocab[tokenizer.EOS] == n - 1
    assert len(merges) == n - 512 - 2
    inv = {i: t for t, i in vocab.items()}
    assert all(inv[i + 256] == inv[i] + "</w>" for i in range(256))
    for w in set(shapes.vocabulary()) | {"a", "the", "image", "picture", "photo", "shape", "background"}:
        assert w in tokenizer.WORDS and w + "</w>" in vocab


def test_clip_tokenizer_loads_written_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    n = tokenizer.write_tokenizer(tmp_path / "tokenizer")
    folder = tmp_path / "tokenizer"
    assert sorted(os.listdir(folder)) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 77
    vocab = json.loads((folder / "vocab.json").read_text())
    assert n == len(vocab) == tokenizer.vocab_size()

    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (bos, eos, eos)
    assert tok.model_max_length == 77 and len(tok) == n
    for w in tokenizer.WORDS:
        assert tok(w).input_ids == [bos, vocab[w + "</w>"], eos], w

    caption = shapes.sample(0, 3)[1]
    enc = tok([caption, "Zebra 123, héllo!"], padding="max_length", max_length=77, truncation=True)
    ids = enc.input_ids[0]
    assert len(ids) == 77 and len(enc.input_ids[1]) == 77
    words = caption.replace(",", " ,").split()
    assert ids[: len(words) + 2] == [bos] + [vocab[w + "</w>"] for w in words] + [eos]
    assert ids[len(words) + 2 :] == [eos] * (77 - len(words) - 2)
    assert sum(enc.attention_mask[0]) == len(words) + 2
    assert tok.decode(ids, skip_special_tokens=True) == caption.replace(",", " ,")
    assert tok.unk_token_id not in enc.input_ids[1][1 : enc.attention_mask[1].index(0) - 1]

    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert auto(caption).input_ids == tok(caption).input_ids
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(folder))
    assert fast(caption).input_ids == tok(caption).input_ids


# ----------------------------------------------------------------- evaluator


def _corrupt(img, rng, sigma, blur):
    if blur:
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(blur)))
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("sigma,blur,threshold", [(0.0, 0.0, 0.99), (10.0, 0.8, 0.98)])
def test_evaluator_reads_dataset_images(sigma, blur, threshold):
    rng = np.random.default_rng(0)
    n, right = 200, 0
    field_right = dict.fromkeys(("background", *FIELDS), 0)
    for i in range(n):
        img, _, lab = shapes.sample(7, i, split="all")
        got = evaluator.evaluate(_corrupt(img, rng, sigma, blur))
        ok = {k: got[k] == lab[k] for k in field_right}
        right += all(ok.values())
        for k, v in ok.items():
            field_right[k] += v
    # Measured: 100% on clean and on sigma=10/blur=0.8 images (600 samples).
    assert right / n >= threshold, field_right


def test_evaluator_other_resolutions_and_empty_image():
    img, _, lab = shapes.sample(8, 1, size=128)
    got = evaluator.evaluate(img)
    assert {k: got[k] for k in ("background", *FIELDS)} == {k: lab[k] for k in ("background", *FIELDS)}
    blank = evaluator.evaluate(np.full((64, 64, 3), shapes.COLORS["blue"], np.uint8))
    assert blank["background"] == "blue" and blank["shape"] is None and blank["objects"] == []
    with pytest.raises(TypeError):
        evaluator.evaluate(np.zeros((64, 64, 3), np.float32))


def test_score():
    img, cap, lab = shapes.sample(9, 0, split="all")
    s = evaluator.score(cap, img)
    assert s["all_ok"] is True
    wrong_color = next(c for c in shapes.COLORS if c not in (lab["color"], lab["background"]))
    wrong_shape = next(x for x in shapes.SHAPES if x != lab["shape"])
    s = evaluator.score(f"a {wrong_color} {wrong_shape} on a {lab['color']} background", img)
    assert (s["color_ok"], s["shape_ok"], s["background_ok"], s["all_ok"]) == (False, False, False, False)
    assert s["position_ok"] is None and s["size_ok"] is None
    # Two shapes: every prompted shape is found.
    rng = np.random.default_rng(1)
    ok = 0
    for i in range(40):
        img, cap, lab = shapes.sample(9, i, max_shapes=2, split="all")
        ok += bool(evaluator.score(cap, _corrupt(img, rng, 8.0, 0.6))["all_ok"])
    assert ok >= 39


# ----------------------------------------------------------------- training data


def _write_image(path, size=(40, 24), color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_load_image_resizes_and_center_crops(tmp_path):
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left third red
    arr[:, 20:40] = (0, 255, 0)  # middle third green
    arr[:, 40:] = (0, 0, 255)  # right third blue
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = tdata.load_image(tmp_path / "wide.png", 16)
    assert x.shape == (16, 16, 3) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    np.testing.assert_allclose(x[8, 8], [-1.0, 1.0, -1.0], atol=0.02)  # centre crop keeps green only
    np.testing.assert_allclose(x[:, 2:-2], np.broadcast_to([-1.0, 1.0, -1.0], (16, 12, 3)), atol=0.05)


def test_folder_with_txt_captions(tmp_path):
    _write_image(tmp_path / "b.png", color=(0, 0, 255))
    (tmp_path / "b.txt").write_text("a blue thing\n")
    _write_image(tmp_path / "sub" / "a.jpg", size=(30, 50))
    (tmp_path / "sub" / "a.txt").write_text("a red thing")
    Image.new("RGBA", (32, 32), (0, 255, 0, 255)).save(tmp_path / "c.webp")
    (tmp_path / "c.txt").write_text("green")
    (tmp_path / "notes.md").write_text("ignored")
    src = tdata.ImageCaptionFolder(tmp_path, size=16)
    assert len(src) == src.num_examples == 3
    captions = [src.get(i)[1] for i in range(3)]
    assert sorted(captions) == ["a blue thing", "a red thing", "green"]
    for i in range(3):
        x, _ = src.get(i)
        assert x.shape == (16, 16, 3) and x.dtype == np.float32 and -1 <= x.min() <= x.max() <= 1


def test_folder_with_metadata_jsonl(tmp_path):
    _write_image(tmp_path / "train" / "0.png")
    _write_image(tmp_path / "train" / "1.png", color=(0, 255, 0))
    lines = [{"file_name": "train/0.png", "text": "red"}, {"file_name": "train/1.png", "text": "green"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    src = tdata.ImageCaptionFolder(tmp_path, size=8)
    assert [src.get(i)[1] for i in range(2)] == ["red", "green"]
    np.testing.assert_allclose(src.get(1)[0][4, 4], [-1, 1, -1], atol=0.01)


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        tdata.ImageCaptionFolder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        tdata.ImageCaptionFolder(empty)
    nocap = tmp_path / "nocap"
    _write_image(nocap / "x.png")
    with pytest.raises(ValueError, match=r"x\.png has no caption"):
        tdata.ImageCaptionFolder(nocap)
    bad = tmp_path / "bad"
    _write_image(bad / "x.png")
    (bad / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n{"file_name": "x.png", "text": \n')
    with pytest.raises(ValueError, match="line 2: malformed"):
        tdata.ImageCaptionFolder(bad)
    (bad / "metadata.jsonl").write_text('{"file_name": "y.png", "text": "ok"}\n')
    with pytest.raises(ValueError, match="line 1: image not found"):
        tdata.ImageCaptionFolder(bad)
    (bad / "metadata.jsonl").write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match="line 1:.*text"):
        tdata.ImageCaptionFolder(bad)
    _write_image(bad / "z.png")
    (bad / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "ok"}\n')
    with pytest.raises(ValueError, match="z.png has no caption"):
        tdata.ImageCaptionFolder(bad)
    for err in ("not found", "no images"):
        try:
            tdata.ImageCaptionFolder(tmp_path / "missing" if err == "not found" else empty)
        except ValueError as e:
            assert "\n" not in str(e)


def _take(it, n):
    return list(itertools.islice(it, n))


def _same(a, b):
    return all(np.array_equal(x["pixels"], y["pixels"]) and x["captions"] == y["captions"] for x, y in zip(a, b))


def test_batches_synthetic_resume():
    src = tdata.SyntheticShapes(seed=1, size=16)
    full = _take(tdata.batches(src, 3, seed=5), 4)
    assert full[0]["pixels"].shape == (3, 16, 16, 3) and full[0]["pixels"].dtype == np.float32
    assert -1.0 <= full[0]["pixels"].min() and full[0]["pixels"].max() <= 1.0
    assert len(full[0]["captions"]) == 3
    resumed = _take(tdata.batches(src, 3, seed=5, start_step=2), 2)
    assert _same(full[2:], resumed)
    other = _take(tdata.batches(src, 3, seed=6), 1)
    assert other[0]["captions"] != full[0]["captions"]
    x, cap = src.get(123)
    img, cap2, _ = shapes.sample(1, 123, 16)
    np.testing.assert_allclose(x, img / 127.5 - 1.0, atol=1e-6)
    assert cap == cap2


def test_batches_folder_epochs_and_resume(tmp_path):
    for i in range(5):
        _write_image(tmp_path / f"{i}.png", size=(8, 8), color=(i * 50, 0, 0))
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    src = tdata.ImageCaptionFolder(tmp_path, size=8)
    full = _take(tdata.batches(src, 3, seed=0), 6)  # 18 examples = 3 epochs + 3
    stream = [c for b in full for c in b["captions"]]
    for e in range(3):  # each epoch shows every image exactly once
        assert sorted(stream[5 * e : 5 * e + 5]) == [f"image {i}" for i in range(5)]
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:15]  # reshuffled per epoch
    for k in (1, 3, 5):
        assert _same(full[k:], _take(tdata.batches(src, 3, seed=0, start_step=k), 6 - k))
    assert _take(tdata.batches(src, 3, seed=1), 2)[0]["captions"] != full[0]["captions"] or \
        _take(tdata.batches(src, 3, seed=1), 2)[1]["captions"] != full[1]["captions"]
    big = _take(tdata.batches(src, 12, seed=0), 1)[0]  # batch larger than the dataset
    assert len(big["captions"]) == 12


def test_batches_random_flip_and_tokenizer():
    src = tdata.SyntheticShapes(seed=2, size=16)
    plain = _take(tdata.batches(src, 16, seed=3), 1)[0]
    flipped = _take(tdata.batches(src, 16, seed=3, random_flip=True), 1)[0]
    again = _take(tdata.batches(src, 16, seed=3, random_flip=True), 1)[0]
    assert _same([flipped], [again])
    n_flipped = 0
    for p, f, cp, cf in zip(plain["pixels"], flipped["pixels"], plain["captions"], flipped["captions"]):
        if np.array_equal(p, f):
            assert cp == cf
        else:
            n_flipped += 1
            np.testing.assert_array_equal(p[:, ::-1], f)
            assert cf == tdata.swap_left_right(cp)
    assert 0 < n_flipped < 16
    assert tdata.swap_left_right("a circle at the top left and on the right") == \
        "a circle at the top right and on the left"
    tok = _take(tdata.batches(src, 2, seed=3, tokenizer=lambda caps: [[len(c)] for c in caps]), 1)[0]
    assert tok["input_ids"].shape == (2, 1)
