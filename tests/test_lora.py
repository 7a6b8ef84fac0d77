"""LoRA loading and merging (sd_jax.lora) against diffusers 0.42 + peft on tiny random pipelines.

Every LoRA file is written by the test with random non-zero factors: kohya (SD 1.x, incl.
LoCon 3x3 convs; SDXL in SGM block names), diffusers/PEFT (``save_lora_weights`` with the
PEFT config in the metadata), diffusers' old attention-processor names, and LyCORIS
LoHa / LoKr / DoRA (which diffusers cannot load: checked against the papers' formulas
written here in numpy).  Tolerances: merged weights <= 1e-5 (measured <= 1.2e-7: the same
float32 products); images (SD 1.x, guidance 1, 2 DDIM steps) <= 2/255 (measured <= 6e-7).
The pipelines run on one device; the whole file takes ~34 s of CPU on the 2-core dev VM
under a load average of ~12 (most of it one generation compile and diffusers' own runs).
"""
import os
import re

import numpy as np
import pytest

from tiny_models import build_tiny_pipeline, nchw

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import peft  # noqa: E402,F401  (the test extra has it: a missing peft fails, not skips)

SIZE, STEPS = 32, 2
PROMPT = ["a small red circle on a blue background"]
W_TOL, IMG_TOL = 1e-5, 2 / 255
UNET_RE = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|"
                     r"resnets\.\d+\.(conv1|time_emb_proj|conv_shortcut))$")
TE_RE = re.compile(r"self_attn\.(q|k|v|out)_proj$|mlp\.fc[12]$")


def _save(sd, path, metadata=None):
    from safetensors.torch import save_file
    save_file({k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)


def _layers(model, pattern, prefix=""):
    """{module name: weight shape} of the Linear / Conv2d layers whose name matches."""
    return {(n if n.startswith(prefix) else prefix + n): tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and pattern.search(n)}


def _factors(rng, shape, rank):
    """(down, up) of a LoRA of ``shape`` (PyTorch layout): convs get LoCon's (r, in, kh, kw) / (out, r, 1, 1)."""
    down_shape = (rank, shape[1]) + tuple(shape[2:])
    up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
    return (rng.standard_normal(down_shape).astype(np.float32) * 0.3,
            rng.standard_normal(up_shape).astype(np.float32) * 0.3)


def kohya_file(path, layers: dict, seed, rank=4, alpha=2.0):
    """layers: {kohya prefix: {module name: shape}} -> a kohya file (``alpha`` on every layer)."""
    rng, sd = np.random.default_rng(seed), {}
    for prefix, mods in layers.items():
        for name, shape in mods.items():
            down, up = _factors(rng, shape, rank)
            key = prefix + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = np.asarray(alpha, np.float32)
    return _save(sd, path)


def peft_file(folder, unet_layers, te_layers, seed, rank=4, alpha=8.0):
    """diffusers' ``save_lora_weights`` of PEFT state dicts, with the LoraConfig as metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    rng = np.random.default_rng(seed)

    def layers(mods):
        out = {}
        for name, shape in mods.items():
            down, up = _factors(rng, shape, rank)
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = torch.tensor(down), torch.tensor(up)
        return out

    meta = lambda mods: LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(mods)).to_dict()
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers(unet_layers),
                                              text_encoder_lora_layers=layers(te_layers),
                                              unet_lora_adapter_metadata=meta(unet_layers),
                                              text_encoder_lora_adapter_metadata=meta(te_layers))
    return os.path.join(str(folder), "pytorch_lora_weights.safetensors")


def attn_processor_file(path, unet, seed, rank=4):
    """diffusers' attention-processor format (0.14-0.20): ``unet.<block>.attn1.processor.to_q_lora.down.weight``."""
    rng, sd = np.random.default_rng(seed), {}
    for name, shape in _layers(unet, re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")).items():
        block, proj = name.rsplit(".attn", 1)[0], name.split(".")[-1] if "to_out" not in name else "to_out"
        attn = "attn" + name.rsplit(".attn", 1)[1].split(".")[0]
        down, up = _factors(rng, shape, rank)
        sd[f"unet.{block}.{attn}.processor.{proj}_lora.down.weight"] = down
        sd[f"unet.{block}.{attn}.processor.{proj}_lora.up.weight"] = up
    return _save(sd, path)


def _one_device_pipe(folder):
    """The pipeline on one device (conftest makes 8 fake ones: a batch of 1 would be padded to 8)."""
    import jax

    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(str(folder), mesh=sharding.make_mesh(jax.devices()[:1]))


def _merged_state(pipe, comp):
    from sd_jax.weights.convert import params_to_state_dict
    return params_to_state_dict(pipe.params[comp])


def _torch_state(model):
    """A PEFT-wrapped model's weights under their plain names (``base_layer`` dropped)."""
    return {k.replace(".base_layer", ""): v.detach().numpy() for k, v in model.state_dict().items()
            if "lora_" not in k}


def _max_weight_diff(pipe, ref, comps):
    worst = 0.0
    for comp in comps:
        ours, theirs = _merged_state(pipe, comp), _torch_state(getattr(ref, comp))
        for k, v in ours.items():
            if k.endswith(".weight") and v.ndim >= 2:  # transformers 5's CLIPTextModel has no text_model.
                worst = max(worst, float(np.abs(v - theirs.get(k, theirs.get(k.removeprefix("text_model.")))).max()))
    return worst


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_sd1")
    ref = build_tiny_pipeline(str(folder / "model"))
    base = {c: {k: v.clone() for k, v in getattr(ref, c).state_dict().items()} for c in ("unet", "text_encoder")}
    pipe = _one_device_pipe(folder / "model")
    unet, te = _layers(ref.unet, UNET_RE), _layers(ref.text_encoder, TE_RE)
    files = {
        # kohya names the text encoder's layers as transformers 4 did (text_model.encoder...)
        "kohya": kohya_file(folder / "kohya.safetensors", {"lora_unet_": unet, "lora_te_": _layers(
            ref.text_encoder, TE_RE, "text_model.")}, seed=1),
        "peft": peft_file(folder / "peft", unet, te, seed=2),
        "attn_proc": attn_processor_file(folder / "attn_proc.safetensors", ref.unet, seed=3),
    }
    assert any(len(s) == 4 and s[2] == 3 for s in unet.values())  # LoCon 3x3 convs are in the kohya file
    return ref, pipe, base, files, folder


def _restore(ref, base):
    ref.unload_lora_weights()
    for c, sd in base.items():
        getattr(ref, c).load_state_dict(sd)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "attn_proc"])
def test_merged_weights_match_diffusers_fuse(sd1, fmt):
    ref, pipe, base, files, _ = sd1
    before = pipe.params
    pipe.load_lora(files[fmt], weight=0.8)
    try:
        ref.load_lora_weights(files[fmt], adapter_name="a")
        ref.fuse_lora(lora_scale=0.8)
        diff = _max_weight_diff(pipe, ref, ("unet", "text_encoder"))
        print(f"{fmt}: max |merged - diffusers fused| {diff:.2e}")
        assert diff <= W_TOL
        assert _merged_state(pipe, "unet") != {}  # the LoRA changed something
        changed = np.abs(_merged_state(pipe, "unet")["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
                         - base["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].numpy())
        assert changed.max() > 1e-3
    finally:
        pipe.unload_lora()
        _restore(ref, base)
    assert pipe.params is before


def _ref_images(ref, lat):
    with torch.no_grad():
        return ref(prompt=PROMPT, latents=nchw(lat), num_inference_steps=STEPS, guidance_scale=1.0,
                   height=SIZE, width=SIZE, output_type="np").images


def _images(pipe, lat):
    return pipe(PROMPT, latents=lat, num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE,
                scheduler="ddim", output_type="np")


def test_images_match_diffusers_one_and_two_loras_without_recompiling(sd1):
    """One LoRA at 1.0, then two at once (0.7, -0.4): images as diffusers' within 2/255; switching
    LoRAs and weights compiles nothing new; unloading gives the base parameters back bit for bit."""
    ref, pipe, base, files, _ = sd1
    lat = np.random.RandomState(0).randn(1, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    base_img = _images(pipe, lat)
    n = pipe.compilations
    base_params = pipe.params
    base_leaves = {k: np.asarray(v) for k, v in _merged_state(pipe, "unet").items()}
    try:
        pipe.load_lora(files["kohya"], weight=1.0)
        ref.load_lora_weights(files["kohya"], adapter_name="kohya")
        one = _images(pipe, lat)
        d1 = float(np.abs(one - _ref_images(ref, lat)).max())
        pipe.load_lora(files["peft"], name="peft")
        pipe.set_lora_weights({"kohya": 0.7, "peft": -0.4})
        ref.load_lora_weights(files["peft"], adapter_name="peft")
        ref.set_adapters(["kohya", "peft"], adapter_weights=[0.7, -0.4])
        two = _images(pipe, lat)
        d2 = float(np.abs(two - _ref_images(ref, lat)).max())
        print(f"max |image diff|: one LoRA {d1:.2e}, two {d2:.2e}")
        assert d1 <= IMG_TOL and d2 <= IMG_TOL
        assert min(np.abs(one - base_img).max(), np.abs(two - one).max()) > 3 * IMG_TOL  # the LoRAs matter
        pipe.use_loras([(files["attn_proc"], 0.5)])  # switch to another LoRA
        assert list(pipe.loras.weights) == ["attn_proc"]
        _images(pipe, lat)
        assert pipe.compilations == n, "a LoRA change recompiled generation"
    finally:
        pipe.unload_lora()
        _restore(ref, base)
    assert pipe.params is base_params
    after = _merged_state(pipe, "unet")
    assert all(np.array_equal(after[k], v) for k, v in base_leaves.items())
    assert np.array_equal(_images(pipe, lat), base_img) and pipe.compilations == n


# ----------------------------------------------------------------------------- LyCORIS, DoRA
def _to_torch_layout(kernel):
    k = np.asarray(kernel)
    return k.T if k.ndim == 2 else k.transpose(3, 2, 0, 1)


def _kernel(params, path):
    node = params
    for p in path.split("/"):
        node = node[p]
    return _to_torch_layout(node["kernel"])


def test_loha_lokr_dora_merge_as_the_lycoris_formulas(sd1, tmp_path):
    _, pipe, _, _, _ = sd1
    rng = np.random.default_rng(7)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3
    q = "down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q"     # linear 32 -> 32
    k = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"     # linear 32 (context) -> 32
    c = "down_blocks_1/resnets_0/conv1"                                  # conv 3x3, 32 -> 64
    v = "down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_v"     # linear 64 -> 64
    o = "up_blocks_1/attentions_0/transformer_blocks_0/attn1/to_out_0"   # linear 64 -> 64
    f = "mid_block/attentions_0/transformer_blocks_0/ff/net_2"           # linear 256 -> 64
    W = {p: _kernel(pipe.params["unet"], p) for p in (q, k, c, v, o, f)}
    kn = lambda p: "lora_unet_" + p.replace("/", "_")
    sd, want = {}, {}
    # LoHa, linear: dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r
    a1, b1, a2, b2 = r(32, 4), r(4, 32), r(32, 4), r(4, 32)
    sd.update({f"{kn(q)}.hada_w1_a": a1, f"{kn(q)}.hada_w1_b": b1, f"{kn(q)}.hada_w2_a": a2,
               f"{kn(q)}.hada_w2_b": b2, f"{kn(q)}.alpha": np.float32(2.0)})
    want[q] = ((a1 @ b1) * (a2 @ b2)) * (2.0 / 4)
    # LoHa with Tucker cores, conv 3x3: each half einsum("ijkl,jr,ip->prkl", t, w_b, w_a)
    t1, t2, a1, b1, a2, b2 = r(3, 3, 3, 3), r(3, 3, 3, 3), r(3, 64), r(3, 32), r(3, 64), r(3, 32)
    sd.update({f"{kn(c)}.hada_t1": t1, f"{kn(c)}.hada_t2": t2, f"{kn(c)}.hada_w1_a": a1, f"{kn(c)}.hada_w1_b": b1,
               f"{kn(c)}.hada_w2_a": a2, f"{kn(c)}.hada_w2_b": b2, f"{kn(c)}.alpha": np.float32(1.5)})
    half = lambda t, wa, wb: np.tensordot(np.tensordot(t, wb, axes=([1], [0])), wa, axes=([0], [0]))  # (k,l,in,out)
    want[c] = (half(t1, a1, b1) * half(t2, a2, b2)).transpose(3, 2, 0, 1) * (1.5 / 3)
    # LoKr: w1 whole, w2 = w2a @ w2b: dW = kron(w1, w2) * alpha / r
    w1, w2a, w2b = r(4, 8), r(8, 2), r(2, 4)
    sd.update({f"{kn(k)}.lokr_w1": w1, f"{kn(k)}.lokr_w2_a": w2a, f"{kn(k)}.lokr_w2_b": w2b,
               f"{kn(k)}.alpha": np.float32(1.0)})
    want[k] = np.kron(w1, w2a @ w2b) * (1.0 / 2)
    # LoKr, both whole: scale 1 (alpha ignored)
    w1, w2 = r(8, 8), r(8, 8)
    sd.update({f"{kn(v)}.lokr_w1": w1, f"{kn(v)}.lokr_w2": w2, f"{kn(v)}.alpha": np.float32(3.0)})
    want[v] = np.kron(w1, w2)
    # DoRA (kohya dora_scale on the output axis, (out, 1)): W' = m * (W + s BA) / ||W + s BA||_row
    down, up, m = r(4, 64), r(64, 4), np.abs(r(64, 1)) + 1
    sd.update({f"{kn(o)}.lora_down.weight": down, f"{kn(o)}.lora_up.weight": up, f"{kn(o)}.alpha": np.float32(2.0),
               f"{kn(o)}.dora_scale": m})
    merged = W[o] + up @ down * 0.5
    want[o] = m * merged / (np.sqrt((merged ** 2).sum(1, keepdims=True)) + np.finfo(np.float32).eps) - W[o]
    # DoRA on the input axis ((1, in), older LyCORIS): the norm of each column
    down, up, m = r(4, 256), r(64, 4), np.abs(r(1, 256)) + 1
    sd.update({f"{kn(f)}.lora_down.weight": down, f"{kn(f)}.lora_up.weight": up, f"{kn(f)}.dora_scale": m})
    merged = W[f] + up @ down
    want[f] = m * merged / (np.sqrt((merged ** 2).sum(0, keepdims=True)) + np.finfo(np.float32).eps) - W[f]
    path = _save(sd, tmp_path / "lycoris.safetensors")
    try:
        lora = pipe.load_lora(path, weight=0.6)
        assert sorted(lora.formats) == ["LyCORIS LoHa", "LyCORIS LoKr", "kohya"]
        for p, dw in want.items():
            got = _kernel(pipe.params["unet"], p)
            err = float(np.abs(got - (W[p] + 0.6 * dw)).max())
            assert err <= W_TOL, (p, err)
    finally:
        pipe.unload_lora()


# ----------------------------------------------------------------------------- SDXL (kohya, SGM names)
def _sgm(name: str, config) -> str | None:
    """A diffusers UNet module name in the original SD (SGM) block names kohya uses for SDXL."""
    L = config.layers_per_block
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)$", name)
    res = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    if m:
        kind, i, sub, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        idx = 1 + i * (L + 1) + j if kind == "down" else i * (L + 1) + j
        rest = res.get(rest, rest) if sub == "resnets" else rest
        return f"{'input' if kind == 'down' else 'output'}_blocks.{idx}.{0 if sub == 'resnets' else 1}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)$", name)
    if m:
        idx = {"resnets0": 0, "attentions0": 1, "resnets1": 2}[m.group(1) + m.group(2)]
        return f"middle_block.{idx}.{res.get(m.group(3), m.group(3)) if m.group(1) == 'resnets' else m.group(3)}"
    return None


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from test_sdxl_pipeline import build_tiny_sdxl
    folder = tmp_path_factory.mktemp("lora_sdxl")
    ref = build_tiny_sdxl(str(folder / "model"))
    pipe = _one_device_pipe(folder / "model")
    unet = {_sgm(n, ref.unet.config): s for n, s in _layers(ref.unet, re.compile(
        r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out|resnets\.\d+\.(conv1|conv2))$")
    ).items()}
    assert None not in unet and any(k.startswith("input_blocks.4.1") for k in unet)
    path = kohya_file(folder / "sdxl_kohya.safetensors",
                      {"lora_unet_": unet, "lora_te1_": _layers(ref.text_encoder, TE_RE, "text_model."),
                       "lora_te2_": _layers(ref.text_encoder_2, TE_RE, "text_model.")}, seed=5, alpha=3.0)
    return ref, pipe, path


def test_sdxl_kohya_sgm_names_match_diffusers(sdxl):
    """Both text encoders and the UNet in SGM names, merged as diffusers fuses them.  (Images are
    compared on SD 1.x above; SDXL generation itself is compared in test_sdxl_pipeline: equal
    merged weights give equal images, and the test budget has no room for a second compile.)"""
    ref, pipe, path = sdxl
    lora = pipe.load_lora(path, weight=0.9)
    try:
        assert not lora.unmatched and {m.component for m in lora.matches} == {"unet", "text_encoder",
                                                                              "text_encoder_2"}
        assert any(m.record.name.startswith("lora_unet_output_blocks_") for m in lora.matches)
        ref.load_lora_weights(path, adapter_name="x")
        ref.fuse_lora(lora_scale=0.9)
        diff = _max_weight_diff(pipe, ref, ("unet", "text_encoder", "text_encoder_2"))
        print(f"SDXL: max |merged - diffusers fused| {diff:.2e}")
        assert diff <= W_TOL
    finally:
        pipe.unload_lora()


# ----------------------------------------------------------------------------- errors
def _one_line_error(fn, *fragments):
    from sd_jax.lora import LoraError
    with pytest.raises(LoraError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_errors_leave_nothing_loaded(sd1, sdxl, tmp_path):
    _, pipe, _, files, _ = sd1
    _, _, sdxl_path = sdxl
    pipe.load_lora(files["attn_proc"], weight=0.5)
    before, weights = pipe.params, dict(pipe.loras.weights)
    # an SDXL LoRA on an SD 1.x model: both named
    _one_line_error(lambda: pipe.load_lora(sdxl_path), "SDXL", "sdxl_kohya", "Stable Diffusion 1.x")
    # keys matching no layer: counted, listed; loaded only with allow_partial
    sd = {"lora_unet_nosuch_layer.lora_down.weight": np.ones((2, 4), np.float32),
          "lora_unet_nosuch_layer.lora_up.weight": np.ones((4, 2), np.float32),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
              np.full((2, 32), 0.1, np.float32),
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight":
              np.full((32, 2), 0.1, np.float32)}
    partial = _save(sd, tmp_path / "partial.safetensors")
    _one_line_error(lambda: pipe.load_lora(partial), "2 of 4 keys match no layer", "nosuch_layer", "--lora-partial")
    # a layer of the wrong shape
    bad = dict(sd)
    bad.pop("lora_unet_nosuch_layer.lora_down.weight"), bad.pop("lora_unet_nosuch_layer.lora_up.weight")
    bad["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"] = np.ones((2, 7),
                                                                                                          np.float32)
    _one_line_error(lambda: pipe.load_lora(_save(bad, tmp_path / "shape.safetensors")), "wrong shape", "to_q")
    # a truncated file, a pickle, a missing name in a LoRA folder
    with open(files["kohya"], "rb") as f:
        blob = f.read()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    _one_line_error(lambda: pipe.load_lora(str(tmp_path / "cut.safetensors")), "truncated", "cut.safetensors")
    (tmp_path / "old.pt").write_bytes(b"\x80\x02}q\x00.")
    _one_line_error(lambda: pipe.load_lora(str(tmp_path / "old.pt")), "pickle", ".safetensors")
    _one_line_error(lambda: pipe.load_lora("nosuch", lora_dir=str(tmp_path)), "'nosuch'", str(tmp_path),
                    "cut", "partial", "shape")
    _one_line_error(lambda: pipe.set_lora_weights({"attn_proc": float("nan")}), "finite")
    assert pipe.params is before and pipe.loras.weights == weights
    # allow_partial loads what matches; by name from the folder
    lora = pipe.load_lora("partial", lora_dir=str(tmp_path), allow_partial=True)
    assert len(lora.matches) == 1 and len(lora.unmatched) == 2
    pipe.unload_lora()


def test_cli_info_lists_matches_and_lora_spec(sd1, capsys):
    from sd_jax import cli
    from sd_jax.lora import parse_spec
    _, _, _, files, folder = sd1
    assert parse_spec("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_spec("C:/x.safetensors") == ("C:/x.safetensors", 1.0) and parse_spec("x") == ("x", 1.0)
    assert cli.main(["info", "--model", str(folder / "model"), "--lora", files["kohya"]]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "0 keys unmatched" in out
    assert ("lora_unet_down_blocks_1_resnets_0_conv1 -> unet/down_blocks_1/resnets_0/conv1/kernel "
            "(lora, rank 4, scale 0.5)") in out
    assert cli.main(["info", "--model", str(folder / "model"), "--lora", "nosuch", "--lora-dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd-jax: error: no LoRA named 'nosuch'")
    # generate checks its --lora files before loading the model
    for spec, msg in ((str(folder / "nope.safetensors"), "not found"), (files["kohya"] + ":nan", "finite")):
        assert cli.main(["generate", "x", "--model", str(folder / "model"), "--lora", spec,
                         "-o", str(folder / "x.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sd-jax: error: ") and msg in err[0], err
