"""LoRA training (``sd-jax train lora``, sd_jax.train.lora) on the tiny random pipeline of
tests/tiny_models.py and a folder of four 32x32 images.

Runs share one compiled train step (same static settings, one device): A trains 6 steps
uninterrupted; B is stopped after step 4 and resumed.  Checked: only the adapters are
trained (the optimizer, EMA and checkpoints hold nothing else; the merged model differs from
the base only in the targeted kernels; the base is bit-identical afterwards), kill-and-resume
is exact, the diffusers/PEFT file loads in diffusers 0.42 (``load_lora_weights``) and gives
sd-jax's image (guidance 1, 2 DDIM steps) within 2/255, the kohya file merges in sd-jax to the
same weights as the PEFT file and as the trained factors (<= 1e-6), every target's names
(attention, feed-forward, projections, LoCon convolutions, text encoder) load in diffusers onto
the same layers (fused weights <= 1e-5).  SDXL (one-level tiny UNet, both text encoders, 3 steps
set up by the command line's parser): the PEFT file gives diffusers' StableDiffusionXLPipeline
sd-jax's image within 2/255, the kohya file (SGM block names, lora_te1_/lora_te2_) merges in
sd-jax to the PEFT file's and the trained weights (<= 1e-6).
"""
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_lora import IMG_TOL, W_TOL, _images, _max_weight_diff, _merged_state, _one_device_pipe, _ref_images
from tiny_models import build_tiny_pipeline

torch = pytest.importorskip("torch")

from sd_jax import sharding  # noqa: E402
from sd_jax.lora import saving  # noqa: E402
from sd_jax.train import cli as train_cli  # noqa: E402
from sd_jax.train import loop, optim  # noqa: E402
from sd_jax.train.lora import TARGETS, LoraLoss, LoraTrainConfig, build_lora_task, lora_folder  # noqa: E402
from sd_jax.weights import loader  # noqa: E402

SIZE = 32


pytestmark = pytest.mark.usefixtures("fast_train_compile")  # conftest: LLVM -O0 train steps


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    ref = build_tiny_pipeline(str(root / "model"))
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, what in enumerate(["a red circle", "a blue square", "a green triangle", "a red square"]):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(what)
    return ref, root


def _config(root, out, **kw):
    base = dict(out=str(root / out), model=str(root / "model"), data=str(root / "data"), size=SIZE, steps=6,
                batch_size=2, lr=1e-2, warmup=0, save_every=3, targets=("attn", "te"), rank=4, alpha=32.0, ema=0.5,
                progress=False)
    base.update(kw)
    return LoraTrainConfig(**base)


def _mesh():
    return sharding.make_mesh(jax.devices()[:1])


def _digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def _leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _np_merged(task, lora) -> dict:
    """``{"unet/.../kernel": W + scale * up @ down}`` of the targeted kernels, in numpy (Flax layout)."""
    out = {}
    for comp, path in task.loss.targets:
        node, f = task.frozen[comp], lora[comp]
        for p in path:
            node, f = node[p], f[p]
        k = np.asarray(node["kernel"], np.float32)
        up, down = np.asarray(f["up"]), np.asarray(f["down"])
        d = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape((up.shape[0],) + down.shape[1:])
        out[f"{comp}/{'/'.join(path)}/kernel"] = k + task.loss.scale * (d.T if d.ndim == 2 else d.transpose(2, 3, 1, 0))
    return out


@pytest.fixture(scope="module")
def run_a(setup):
    _, root = setup
    before = _digest(root / "model")
    cfg = _config(root, "a")
    task = build_lora_task(cfg)
    base = {k: _leaves(v) for k, v in task.frozen.items()}
    result = loop.run(cfg, task, mesh=_mesh())
    return cfg, task, base, result, before


@pytest.fixture(scope="module")
def run_b(setup, run_a):
    _, root = setup
    from sd_jax.train.lora import train_lora
    first = train_lora(_config(root, "b", stop_after=4), mesh=_mesh())
    return first, train_lora(_config(root, "b"), mesh=_mesh())


def _load_merged_as_trained(pipe, path, name, task, comps, trained):
    """Load a LoRA file the training wrote: every key matches one of the trained targets, and
    the merged kernels equal the training loss's merge (<= 1e-6). Returns the merged leaves."""
    lora = pipe.load_lora(path, name=name)
    assert not lora.unmatched and len(lora.matches) == len(task.loss.targets)
    merged = _leaves({c: pipe.params[c] for c in comps})
    diff = max(float(np.abs(merged[k] - trained[k]).max()) for k in trained)
    assert diff <= 1e-6, (name, diff)
    return merged


def test_only_the_adapters_train_and_the_base_stays_bit_identical(setup, run_a):
    _, root = setup
    cfg, task, base, result, before = run_a
    assert result.finished and result.step == 6 and len(result.log) == 6
    losses = [r["loss"] for r in result.log]
    assert np.mean(losses[3:]) < np.mean(losses[:3])
    # the optimizer / EMA / checkpoints hold the factors only
    assert set(result.params) == {"lora"} and set(result.ema) == {"lora"}
    # what the checkpoint holds, read from its own metadata (file sizes are mostly orbax's
    # per-leaf metadata at this tiny size): the factors, their two Adam moments and the EMA
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(os.path.join(cfg.out, "checkpoints", "6", "default"))
    saved = [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(meta.item_metadata.tree)
             if getattr(v, "shape", ())]
    assert saved and all("'lora'" in k for k, _ in saved), [k for k, _ in saved if "'lora'" not in k][:5]
    n_ckpt = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for _, v in saved)
    n_lora = sum(x.nbytes for x in jax.tree.leaves(result.params))
    n_base = sum(x.nbytes for c in ("unet", "text_encoder") for x in jax.tree.leaves(task.frozen[c]))
    assert n_ckpt == 4 * n_lora < n_base, (n_ckpt, n_lora, n_base)  # factors + moments + EMA, not the model
    # the base: bit-identical in memory and on disk
    fresh = jax.device_get(loader.load(cfg.model).params)
    for comp, leaves in base.items():
        now, disk = _leaves(task.frozen[comp]), _leaves(fresh[comp])
        assert all(np.array_equal(v, now[k]) and np.array_equal(v, disk[k]) for k, v in leaves.items()), comp
    assert _digest(root / "model") == before
    # training starts from the base model exactly: every up factor is zero
    init = _leaves(task.init())
    assert all(not v.any() for k, v in init.items() if k.endswith("/up")) and len(init) == 2 * len(task.loss.targets)
    assert os.path.isfile(os.path.join(lora_folder(cfg.out), saving.PEFT_FILE))


def test_kill_and_resume_equals_the_uninterrupted_run(run_a, run_b):
    _, _, _, a, _ = run_a
    first, resumed = run_b
    assert not first.finished and first.step == 4 and resumed.finished
    assert [r["loss"] for r in resumed.log] == [r["loss"] for r in a.log]
    for name in ("params", "ema"):
        ours, theirs = _leaves(getattr(resumed, name)), _leaves(getattr(a, name))
        assert ours.keys() == theirs.keys() and all(np.array_equal(v, theirs[k]) for k, v in ours.items())


def test_files_load_in_diffusers_and_sd_jax_with_the_same_images(setup, run_a):
    ref, root = setup
    cfg, task, base, result, _ = run_a
    folder = lora_folder(cfg.out)
    peft, kohya = os.path.join(folder, saving.PEFT_FILE), os.path.join(folder, "a.safetensors")
    pipe = _one_device_pipe(root / "model")
    lat = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    base_img = _images(pipe, lat)
    trained = _np_merged(task, result.ema["lora"])
    merged = {}
    try:
        for name, path in (("peft", peft), ("kohya", kohya)):
            merged[name] = _load_merged_as_trained(pipe, path, name, task, ("unet", "text_encoder"), trained)
            # the trained LoRA changes exactly the targeted kernels (text encoder included)
            changed = {k for k, v in merged[name].items() if not np.array_equal(v, base[k.split("/")[0]][
                k.split("/", 1)[1]])}
            assert changed == set(trained) and any(k.startswith("text_encoder/") for k in changed)
            pipe.unload_lora()
        pipe.load_lora(peft, name="peft")
        ours = _images(pipe, lat)
        ref.load_lora_weights(folder, adapter_name="trained")
        theirs = _ref_images(ref, lat)
    finally:
        pipe.unload_lora()
        ref.unload_lora_weights()
    d = float(np.abs(ours - theirs).max())
    print(f"max |sd-jax - diffusers| {d:.2e}; LoRA vs base {np.abs(ours - base_img).max():.2e}")
    assert d <= IMG_TOL
    # the LoRA matters: it moves the image by more than the tolerance (the tiny UNet's output is damped x0.1)
    assert np.abs(ours - base_img).max() > max(IMG_TOL, 1000 * d)


def test_every_target_is_written_under_names_diffusers_puts_on_the_same_layers(setup, tmp_path):
    """All targets at once, random non-zero factors (no training): diffusers' fused weights equal sd-jax's."""
    ref, root = setup
    cfg = _config(root, tmp_path / "all", targets=tuple(TARGETS), alpha=3.0)
    task = build_lora_task(cfg)
    rng = np.random.default_rng(1)
    factors = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.2, task.params["lora"])
    task.export(str(tmp_path / "out"), {"lora": factors})
    kinds = {"/".join(p[-2:]) for _, p in task.loss.targets}
    assert {"attn1/to_q", "attn2/to_out_0", "ff/net_2", "attentions_0/proj_in",
            "resnets_0/conv1", "self_attn/q_proj", "mlp/fc1"} <= kinds
    pipe = _one_device_pipe(root / "model")
    base = {c: {k: v.clone() for k, v in getattr(ref, c).state_dict().items()} for c in ("unet", "text_encoder")}
    try:
        pipe.load_lora(str(tmp_path / "out" / "all.safetensors"))
        ref.load_lora_weights(str(tmp_path / "out"), adapter_name="all")
        ref.fuse_lora(lora_scale=1.0)
        diff = _max_weight_diff(pipe, ref, ("unet", "text_encoder"))
        ours, theirs = _np_merged(task, factors), _leaves({c: pipe.params[c] for c in ("unet", "text_encoder")})
        assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) <= 1e-6
        # and the training loss merges as the files say (square kernels catch a transposition; a 3x3 conv)
        picked = tuple(t for t in task.loss.targets if "/".join(t[1]).endswith(
            ("attn1/to_q", "self_attn/q_proj", "resnets_0/conv1")))[:6]
        sub = LoraLoss(None, picked, task.loss.scale).merge({**task.frozen, "lora": factors})
        names = {f"{c}/{'/'.join(p)}/kernel" for c, p in picked}
        sub = {k: v for k, v in _leaves(sub).items() if k in names}
        assert len(sub) == len(picked) >= 3 and max(float(np.abs(v - ours[k]).max()) for k, v in sub.items()) <= 1e-6
    finally:
        pipe.unload_lora()
        ref.unload_lora_weights()
        for c, sd in base.items():
            getattr(ref, c).load_state_dict(sd)
    print(f"all targets: max |sd-jax merged - diffusers fused| {diff:.2e}")
    assert diff <= W_TOL
    assert _merged_state(pipe, "unet")  # unloaded: the base again


def test_bf16_base_and_remat_trace(setup, tmp_path):
    _, root = setup
    from sd_jax.train import losses
    task = build_lora_task(_config(root, tmp_path / "bf16", base_dtype="bf16", remat=True))
    assert task.frozen["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert task.frozen["text_encoder"]["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
    assert task.loss.base.remat
    batch = {"pixels": jax.ShapeDtypeStruct((2, SIZE, SIZE, 3), jnp.float32),
             "input_ids": jax.ShapeDtypeStruct((2, 77), jnp.int32)}
    count = losses._remat_count[0]
    out, _ = jax.eval_shape(task.loss, {**task.frozen, **task.params}, batch, jax.random.key(0))
    assert out.dtype == jnp.float32 and losses._remat_count[0] > count


@pytest.mark.parametrize("argv,match", [
    (["--rank", "0"], "rank must be"),
    (["--rank", "-2"], "rank must be"),
    (["--targets", "attn,mlp"], "unknown LoRA target 'mlp'"),
    (["--alpha", "0"], "alpha must be positive"),
    (["--train", "unet"], "unrecognized"),
])
def test_bad_input_is_one_line(setup, argv, match, capsys):
    _, root = setup
    args = ["--model", str(root / "model"), "--data", str(root / "data"), "--out", str(root / "bad")] + argv
    with pytest.raises(ValueError, match=match) as e:
        train_cli.config_from_args("lora", args)
    assert "\n" not in str(e.value)
    from sd_jax.cli import main
    assert main(["train", "lora"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-jax: error:") and match.split("'")[0] in err[0]


def test_cli_builds_the_lora_config(setup):
    _, root = setup
    cfg = train_cli.config_from_args("lora", [
        "--model", str(root / "model"), "--data", str(root / "data"), "--out", str(root / "c"), "--rank", "8",
        "--alpha", "4", "--targets", "attn, conv,te", "--base-dtype", "bf16", "--remat"])
    assert isinstance(cfg, LoraTrainConfig) and cfg.rank == 8 and cfg.scale == 0.5 and cfg.remat
    assert cfg.targets == ("attn", "conv", "te") and cfg.base_dtype == "bf16" and cfg.size == SIZE


# --------------------------------------------------------------------------- SDXL
# The tiny random SDXL of test_sdxl_pipeline with test_train_sdxl's one-level UNet (a third of
# the two-level one's compile time); a few steps on the same four images, attention + both text
# encoders: the files carry lora_te1_ / lora_te2_ and text_encoder. / text_encoder_2. names.

@pytest.fixture(scope="module")
def sdxl_run(setup):
    from test_sdxl_pipeline import build_tiny_sdxl
    from test_train_sdxl import ONE_LEVEL
    _, root = setup
    ref = build_tiny_sdxl(str(root / "sdxl"), **ONE_LEVEL)
    ref.set_progress_bar_config(disable=True)
    # as the command line makes it (the size from the model: 16 latents x 2)
    argv = ["--model", str(root / "sdxl"), "--data", str(root / "data"), "--out", str(root / "xl"), "--steps", "3",
            "--batch-size", "2", "--lr", "3e-2", "--warmup", "0", "--save-every", "3", "--targets", "attn,te",
            "--rank", "2", "--alpha", "32", "--ema", "0", "--no-progress"]
    cfg = train_cli.config_from_args("lora", argv)
    assert cfg == _config(root, "xl", model=str(root / "sdxl"), lr=3e-2, steps=3, save_every=3, rank=2, alpha=32.0,
                          ema=0.0, keep=2)
    task = build_lora_task(cfg)
    return ref, cfg, task, loop.run(cfg, task, mesh=_mesh())


def test_sdxl_lora_loads_in_diffusers_with_the_same_image_and_kohya_merges_the_same(setup, sdxl_run):
    from tiny_models import nchw
    _, root = setup
    ref, cfg, task, result = sdxl_run
    assert result.finished and set(result.params) == {"lora"}
    comps = {c for c, _ in task.loss.targets}
    assert comps == {"unet", "text_encoder", "text_encoder_2"}
    folder = lora_folder(cfg.out)
    peft, kohya = os.path.join(folder, saving.PEFT_FILE), os.path.join(folder, "xl.safetensors")
    from safetensors import safe_open
    with safe_open(kohya, "np") as f:
        names = list(f.keys())
    with safe_open(peft, "np") as f:
        names += list(f.keys())
    for prefix in ("lora_unet_input_blocks_1_1_", "lora_te1_", "lora_te2_", "unet.", "text_encoder.",
                   "text_encoder_2."):
        assert any(n.startswith(prefix) for n in names), prefix
    pipe = _one_device_pipe(root / "sdxl")
    prompt = ["a red circle"]
    lat = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    gen = dict(num_inference_steps=2, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="np")
    base_img = np.asarray(pipe(prompt, latents=lat, **gen))
    trained = _np_merged(task, result.params["lora"])
    merged = {}
    try:
        for name, path in (("peft", peft), ("kohya", kohya)):
            merged[name] = _load_merged_as_trained(pipe, path, name, task, comps, trained)
            if name == "kohya":
                assert merged["kohya"].keys() == merged["peft"].keys()
                assert max(float(np.abs(v - merged["peft"][k]).max()) for k, v in merged["kohya"].items()) <= 1e-6
                break
            pipe.unload_lora()
        ours = np.asarray(pipe(prompt, latents=lat, **gen))   # the kohya file's merge
        ref.load_lora_weights(folder, adapter_name="trained")
        with torch.no_grad():
            theirs = ref(prompt=prompt, latents=nchw(lat), **gen).images
    finally:
        pipe.unload_lora()
        ref.unload_lora_weights()
    d = float(np.abs(ours - theirs).max())
    print(f"SDXL: max |sd-jax - diffusers| {d:.2e}; LoRA vs base {np.abs(ours - base_img).max():.2e}")
    assert d <= IMG_TOL
    assert np.abs(ours - base_img).max() > max(IMG_TOL, 1000 * d)   # the LoRA matters
