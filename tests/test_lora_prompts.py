"""``<lora:name:weight>`` prompt tags applied (Python API, ``sd-jax generate``, ``sd-jax batch``),
A1111's ``Lora hashes`` in the PNG parameters, and the errors.

The shipped model (checkpoints/sd-jax-shapes) at 64x64 with 2 steps, loaded once; the CLI runs
in-process on that pipeline (``commands.load`` patched), so one program is compiled for the
whole file.  LoRA files: kohya keys on the UNet's cross-attention kernels, random factors
written by the test.  A tag must give exactly the image of the same file given explicitly
(the same merged parameters: bit for bit).
"""
import hashlib
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from sd_jax import cli, commands

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")
GEN = dict(num_inference_steps=2, height=64, width=64, output_type="uint8", seed=3)
CLI = ["--size", "64x64", "--steps", "2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def pipe():
    import jax

    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(
        SHIPPED, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))


def _kohya(path, unet_params, seed, rank=4):
    """A kohya LoRA of every cross-attention kernel (torch layout (out, in): down (r, in), up (out, r))."""
    from safetensors.numpy import save_file

    from sd_jax.weights.convert import flatten
    rng, sd = np.random.default_rng(seed), {}
    for p, v in flatten(unet_params).items():
        if p[-1] == "kernel" and "attn2" in p and v.ndim == 2:
            key = "lora_unet_" + "_".join(p[:-1])
            sd[f"{key}.lora_down.weight"] = rng.standard_normal((rank, v.shape[0])).astype(np.float32) * 0.5
            sd[f"{key}.lora_up.weight"] = rng.standard_normal((v.shape[1], rank)).astype(np.float32) * 0.5
            sd[f"{key}.alpha"] = np.asarray(rank, np.float32)
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    os.makedirs(folder / "styles")
    return {"dir": str(folder), "x": _kohya(folder / "x.safetensors", pipe.params["unet"], 1),
            "y": _kohya(folder / "styles" / "y.safetensors", pipe.params["unet"], 2)}


@pytest.fixture
def shared(pipe, monkeypatch):
    """``sd-jax`` commands run in-process on the module's pipeline (no LoRA left merged after)."""
    monkeypatch.setattr(commands, "load", lambda args, mesh=None: pipe)
    yield pipe
    pipe.unload_lora()


def _addnet_hash(path) -> str:
    """The sha256 of the tensor data after the safetensors header, first 12 hex digits."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_tag_is_the_explicit_lora_without_recompiling(pipe, loras):
    base_params = pipe.params
    base = np.asarray(pipe("a red circle", **GEN))
    n = pipe.compilations
    tagged = np.asarray(pipe("a red circle <lora:x:0.7>", lora_dir=loras["dir"], **GEN))
    assert pipe.params is base_params and not pipe.loras.weights  # the tag's LoRA is gone after the call
    # as A1111: a negative prompt's tags are not applied (and not read as words)
    np.testing.assert_array_equal(pipe("a red circle", "<lora:x:0.7>", lora_dir=loras["dir"], **GEN), base)
    out, n_rows = pipe.generate_async("a red circle <lora:x:0.7>", lora_dir=loras["dir"], num_inference_steps=2,
                                      height=64, width=64, seed=3)
    async_tagged = np.asarray(out)[:n_rows]
    pipe.lora_dir = loras["dir"]
    try:
        other = np.asarray(pipe("a red circle <lora:y:-0.5>", **GEN))  # in a sub-folder, by pipe.lora_dir
        pipe.load_lora(loras["x"], weight=0.7)
        explicit = np.asarray(pipe("a red circle", **GEN))
        both = np.asarray(pipe("a red circle <lora:y:-0.5>", **GEN))  # added to the loaded one
        assert pipe.loras.weights == {"x": 0.7}
    finally:
        pipe.lora_dir = None
        pipe.unload_lora()
    assert pipe.compilations == n  # LoRAs from tags are arguments: nothing compiled again
    np.testing.assert_array_equal(tagged, explicit)
    np.testing.assert_array_equal(async_tagged, tagged)
    for a, b in ((tagged, base), (other, base), (other, tagged), (both, tagged)):
        assert np.abs(a.astype(int) - b).max() > 8
    with pytest.raises(ValueError, match=r"different LoRAs \(x:0.7 / none\)"):
        pipe(["a <lora:x:0.7>", "b"], lora_dir=loras["dir"], **GEN)
    with pytest.raises(ValueError, match=r"no LoRA named 'nosuch' in .*loras.* \(it has: x, y\)"):
        pipe("a <lora:nosuch:1>", lora_dir=loras["dir"], **GEN)
    with pytest.raises(ValueError, match=r"<lora:x:1> needs a LoRA folder .* lora_dir="):
        pipe("a <lora:x>", **GEN)
    assert pipe.params is base_params


def test_generate_applies_tags_and_writes_lora_hashes(shared, loras, tmp_path):
    from sd_jax.images import read_metadata
    a, b = str(tmp_path / "tag.png"), str(tmp_path / "flag.png")
    assert cli.main(["generate", "a red circle <lora:x:0.7>", "--lora-dir", loras["dir"], "-o", a] + CLI) == 0
    shared.unload_lora()
    assert cli.main(["generate", "a red circle", "--lora", f"{loras['x']}:0.7", "-o", b] + CLI) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    h = _addnet_hash(loras["x"])
    for path, prompt in ((a, "a red circle <lora:x:0.7>"), (b, "a red circle <lora:x:0.7>")):
        params = Image.open(path).text["parameters"]
        assert params.splitlines()[0] == prompt  # as written; an explicit --lora added as its tag
        assert f'Lora hashes: "x: {h}"' in params
        meta = read_metadata(path)
        assert meta["loras"] == {"x": 0.7} and meta["lora_hashes"] == {"x": h}
    assert read_metadata(a)["prompt"] == "a red circle <lora:x:0.7>"


@pytest.mark.parametrize("prompt, extra, fragments", [
    ("a <lora:x:0.7>", [], ["<lora:x:0.7>", "--lora-dir"]),
    ("a <lora:nosuch:1>", ["--lora-dir", "DIR"], ["no LoRA named 'nosuch' in", "it has: x, y"]),
    ("a <lora:x:heavy>", ["--lora-dir", "DIR"], ["weight 'heavy' is not a number"]),
])
def test_generate_tag_errors_are_one_line(shared, loras, tmp_path, capsys, prompt, extra, fragments):
    extra = [loras["dir"] if e == "DIR" else e for e in extra]
    assert cli.main(["generate", prompt, "-o", str(tmp_path / "e.png")] + extra + CLI) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sd-jax: error: "), err
    for f in fragments:
        assert f in err[0], (f, err[0])
    assert not os.path.exists(tmp_path / "e.png")


def _png(path):
    return np.asarray(Image.open(path))


def test_batch_groups_rows_by_tags_and_records_the_files(shared, loras, tmp_path, capsys):
    rows = [{"prompt": "a red circle <lora:x:0.7>", "seed": 3, "name": "x.png"},
            {"prompt": "a red circle", "seed": 3, "name": "none.png"},
            {"prompt": "a red circle <lora:y:-0.5>", "seed": 3, "name": "y.png"},
            {"prompt": "a blue square <lora:x:0.7>", "seed": 4, "name": "x2.png"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "plain.jsonl").write_text(json.dumps({"prompt": "a red circle", "seed": 3, "name": "x.png"}) + "\n")
    out, ref = tmp_path / "out", tmp_path / "ref"
    n = shared.compilations
    assert cli.main(["batch", str(tmp_path / "p.jsonl"), "--out", str(out), "--lora-dir", loras["dir"]] + CLI) == 0
    assert shared.compilations - n <= 1 and not shared.loras.weights  # one program for every group
    assert cli.main(["batch", str(tmp_path / "plain.jsonl"), "--out", str(ref), "--lora", f"{loras['x']}:0.7"]
                    + CLI) == 0
    np.testing.assert_array_equal(_png(out / "x.png"), _png(ref / "x.png"))
    for a, b in (("x.png", "none.png"), ("y.png", "none.png"), ("x.png", "y.png")):
        assert np.abs(_png(out / a).astype(int) - _png(out / b)).max() > 8
    assert f'Lora hashes: "x: {_addnet_hash(loras["x"])}"' in Image.open(out / "x2.png").text["parameters"]
    assert "Lora hashes" not in Image.open(out / "none.png").text["parameters"]
    assert Image.open(ref / "x.png").text["parameters"].splitlines()[0] == "a red circle <lora:x:0.7>"

    job = json.load(open(out / "sd-jax-batch.json"))["settings"]
    assert job["loras"] == [] and sorted((os.path.basename(r["file"]), r["hash"]) for r in job["prompt_loras"]) == [
        ("x.safetensors", _addnet_hash(loras["x"])), ("y.safetensors", _addnet_hash(loras["y"]))]
    assert json.load(open(ref / "sd-jax-batch.json"))["settings"]["loras"][0]["weight"] == 0.7
    capsys.readouterr()
    _kohya(loras["y"], shared.params["unet"], 7)  # the LoRA file changed: another job
    assert cli.main(["batch", str(tmp_path / "p.jsonl"), "--out", str(out), "--lora-dir", loras["dir"]] + CLI) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the images of another job" in err[0] and "<lora:...> files" in err[0], err
    assert cli.main(["batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o2")] + CLI) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p.jsonl line 1:" in err[0] and "--lora-dir" in err[0], err


def test_jobs_without_loras_record_none(tmp_path):
    from sd_jax import batch
    args = cli.build_parser().parse_args(["batch", "p.txt", "--out", "o"])
    assert "loras" not in batch.job_of_args(args, "m", [(1, {"prompt": "a"})])["settings"]
