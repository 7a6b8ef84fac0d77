"""``sd-jax serve`` and the features that landed after it: ``/sdapi/v1/loras``,
``/sdapi/v1/embeddings`` (tags applied: tests/test_serve_lora.py), and the safety
checker's flags in responses.

In-process (FastAPI's TestClient); the listings need no generation (the shipped model is
loaded, nothing compiled); the safety test generates with the tiny SD1 pipeline of
tests/tiny_models.py and a tiny checker (tests/test_safety_checker.py's builder) on one device.
"""
import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")


def one_device():
    import jax

    from sd_jax import sharding
    return sharding.make_mesh(jax.devices()[:1])


def client_for(pipe, **server):
    from fastapi.testclient import TestClient

    from sd_jax.serve.app import Limits, Server, create_app
    from sd_jax.serve.worker import BatchWorker
    worker = BatchWorker(pipe, max_batch=2, max_wait_ms=5, queue_size=8)
    s = Server(worker, Limits(max_side=256, max_steps=10, max_images=4, timeout_s=120), **server)
    s.ready = True
    return TestClient(create_app(s), raise_server_exceptions=False), worker


@pytest.fixture(scope="module")
def shipped():
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(SHAPES, mesh=one_device())


# ----------------------------------------------------------------------------- /loras, /embeddings
def test_loras_listed_as_a1111(shipped, tmp_path):
    from safetensors.numpy import save_file
    loras = tmp_path / "loras"
    (loras / "styles").mkdir(parents=True)
    freq = {"10_ink": {"ink": 3}}
    save_file({"w": np.zeros(2, np.float32)}, str(loras / "ink.safetensors"),
              metadata={"ss_output_name": "ink-v2", "ss_tag_frequency": json.dumps(freq), "ss_network_dim": "4"})
    save_file({"w": np.zeros(2, np.float32)}, str(loras / "styles" / "detail.safetensors"))
    (loras / "notes.txt").write_text("not a LoRA")
    (loras / ".hidden.safetensors").write_bytes(b"")
    c, _ = client_for(shipped, lora_dir=str(loras))
    r = c.get("/sdapi/v1/loras")
    assert r.status_code == 200, r.text
    assert r.json() == [
        {"name": "ink", "alias": "ink-v2", "path": str(loras / "ink.safetensors"),
         "metadata": {"ss_output_name": "ink-v2", "ss_tag_frequency": freq, "ss_network_dim": "4"}},
        {"name": "detail", "alias": "detail", "path": str(loras / "styles" / "detail.safetensors"), "metadata": {}}]
    assert client_for(shipped)[0].get("/sdapi/v1/loras").json() == []  # no --lora-dir


def test_embeddings_listed_as_a1111(shipped, tmp_path):
    from safetensors.numpy import save_file
    width = shipped.models.text_encoder.config.hidden_size
    folder = tmp_path / "emb"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"emb_params": rng.normal(size=(3, width)).astype(np.float32)}, str(folder / "inkstyle.safetensors"))
    save_file({"emb_params": rng.normal(size=(1, width)).astype(np.float32)}, str(folder / "unused.safetensors"))
    pipe = shipped
    saved = (pipe.models, pipe.params, pipe.tokenizers, pipe.tokenizer, dict(pipe.embeddings))
    try:
        pipe.load_embeddings([str(folder / "inkstyle.safetensors")])
        c, _ = client_for(pipe, embeddings_dir=str(folder))
        r = c.get("/sdapi/v1/embeddings")
        assert r.status_code == 200, r.text
        none = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        assert r.json() == {"loaded": {"inkstyle": {**none, "shape": width, "vectors": 3}},
                            "skipped": {"unused": {**none, "shape": width, "vectors": 1}}}
    finally:
        pipe.models, pipe.params, pipe.tokenizers, pipe.tokenizer, pipe.embeddings = saved


def test_serve_folder_flags_checked_before_loading(tmp_path, capsys):
    from sd_jax import cli
    for flag in ("--lora-dir", "--embeddings-dir"):
        missing = str(tmp_path / "nope")
        assert cli.main(["serve", "--port", "0", flag, missing]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sd-jax: error: {flag} {missing!r} is not a folder"]


# ----------------------------------------------------------------------------- tiny SD1 + checker + ControlNet
def square_png() -> str:
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


CONTROL = {"alwayson_scripts": {"controlnet": {"args": [{"image": square_png(), "module": "canny",
                                                         "model": "cn_edges", "weight": 0.3}]}}}
NATIVE_CONTROL = {"controlnet": "cn_edges", "image": square_png(), "kind": "canny", "scale": 0.3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1 folder with a tiny safety checker (tests/test_safety_checker.py's builder),
    a ``--controlnet-dir`` holding one ControlNet made from its UNet, loaded as the server
    loads them (``--safety-policy keep``: the images come back as the checker saw them)."""
    import diffusers
    import torch

    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.serve.extras import load_controlnets
    from test_safety_checker import build_checker
    from tiny_models import build_tiny_pipeline
    folder = tmp_path_factory.mktemp("sd_checked")
    ref = build_tiny_pipeline(str(folder))
    build_checker(folder, size=32)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (folder / "model_index.json").write_text(json.dumps(index))
    nets = tmp_path_factory.mktemp("controlnets")
    torch.manual_seed(1)
    cn = diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():  # random zero-convolutions: the ControlNet changes the image
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn_like(p))
    cn.save_pretrained(nets / "cn_edges")
    (nets / "notes.txt").write_text("not a ControlNet")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), mesh=one_device(), safety_policy="keep")
    assert load_controlnets(pipe, str(nets)) == ["cn_edges"] and pipe.safety_checker is not None
    return pipe


def test_safety_flags_in_responses(tiny):
    """Concept 3 of the checker is set to the first image's embedding, between the two images'
    cosine and 1: the same images come back flagged [True, False] (the checker's parameters
    are an input of the compiled program: nothing recompiles), in A1111's ``info``, the
    native ``nsfw_content_detected`` and each PNG's metadata; equal to the checker's own
    verdict on the returned images."""
    import jax
    import jax.numpy as jnp

    from sd_jax import sharding
    from sd_jax.images import read_metadata
    pipe = tiny
    c, worker = client_for(pipe)
    worker.start()
    saved = pipe.safety_params
    try:
        body = {"prompt": "a red circle", "seed": 5, "steps": 2, "width": 32, "height": 32, "batch_size": 2,
                "cfg_scale": 1.0, **CONTROL}  # the ControlNet test's program: one compilation for both
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        first = np.stack([decode(b) for b in r.json()["images"]])
        assert json.loads(r.json()["info"])["nsfw_content_detected"] == [False, False]  # random concepts

        checker, params = pipe.safety_checker, jax.device_get(pipe.safety_params)
        emb = np.asarray(checker.embed(params, jnp.asarray(first)))
        cos = float(emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1]))
        assert cos < 0.99, "the two images must differ for the construction"
        concepts, weights = np.array(params["concept_embeds"]), np.array(params["concept_embeds_weights"])
        concepts[3], weights[3] = emb[0], (1 + cos) / 2
        params = {**params, "concept_embeds": concepts, "concept_embeds_weights": weights}
        pipe.safety_params = sharding.replicate(params, pipe.mesh)

        r = c.post("/sdapi/v1/txt2img", json=body)
        images = np.stack([decode(b) for b in r.json()["images"]])
        np.testing.assert_array_equal(images, first)
        want = np.asarray(checker.scores(params, jnp.asarray(images))["nsfw"]).tolist()
        assert want == [True, False]
        assert json.loads(r.json()["info"])["nsfw_content_detected"] == want
        native = c.post("/v1/generate", json={"prompt": "a red circle", "seed": 5, "steps": 2, "width": 32,
                                              "height": 32, "num_images": 2, "guidance": 1.0,
                                              "controls": [NATIVE_CONTROL]}).json()
        assert native["nsfw_content_detected"] == want
        for b, image, flag in zip(native["images"], images, want):
            np.testing.assert_array_equal(decode(b), image)
            assert read_metadata(io.BytesIO(base64.b64decode(b)))["nsfw_content_detected"] == flag
    finally:
        pipe.safety_params = saved
        worker.stop(30)


# ----------------------------------------------------------------------------- ControlNet
def test_controlnet_units_equal_python_api(tiny):
    """The sd-webui-controlnet extension's ``alwayson_scripts`` (canny computed by the server)
    and the native ``controls``: the image equals the Python API's with the same ControlNet,
    edges, weight and window."""
    from sd_jax.control import canny
    pipe = tiny
    edges = canny(decode(square_png()))
    common = dict(seed=3, num_inference_steps=2, guidance_scale=1.0, height=32, width=32, num_images_per_prompt=2,
                  control_image=edges, controlnet="cn_edges", output_type="uint8")
    want = np.asarray(pipe("a red circle", controlnet_conditioning_scale=0.5, control_guidance_end=0.6, **common))
    off = np.asarray(pipe("a red circle", controlnet_conditioning_scale=0.0, **common))  # traced: not recompiled
    assert not np.array_equal(want, off)  # the ControlNet steers
    c, worker = client_for(pipe)
    worker.start()
    try:
        unit = {"image": square_png(), "module": "canny", "model": "cn_edges [0123abcd]", "weight": 0.5,
                "guidance_start": 0.0, "guidance_end": 0.6, "pixel_perfect": False, "control_mode": "Balanced"}
        body = {"prompt": "a red circle", "seed": 3, "steps": 2, "cfg_scale": 1.0, "width": 32, "height": 32,
                "batch_size": 2, "alwayson_scripts": {"controlnet": {"args": [unit, {**unit, "model": "nope", "enabled": False}]}}}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.stack([decode(b) for b in r.json()["images"]]), want)
        assert r.json()["unsupported"] == []
        info = json.loads(r.json()["info"])
        assert info["extra_generation_params"]["ControlNet 0"].startswith("Module: canny, Model: cn_edges, Weight: 0.5")
        native = c.post("/v1/generate", json={
            "prompt": "a red circle", "seed": 3, "steps": 2, "guidance": 1.0, "width": 32, "height": 32, "num_images": 2,
            "controls": [{"controlnet": "cn_edges", "image": square_png(), "kind": "canny", "scale": 0.5,
                          "end": 0.6}]})
        assert native.status_code == 200, native.text
        np.testing.assert_array_equal(np.stack([decode(b) for b in native.json()["images"]]), want)
        assert native.json()["parameters"][0]["controlnets"][0]["model"] == "cn_edges"
        # refused before anything is queued: a name outside --controlnet-dir, a bad native kind
        for bad in ({**unit, "model": "../cn_edges"}, {**unit, "model": "other"}):
            r = c.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [bad]}}})
            assert r.status_code == 422 and "is not a ControlNet of this server (loaded: cn_edges)" in r.json()["detail"]
        r = c.post("/v1/generate", json={"prompt": "x", "steps": 2, "width": 32, "height": 32, "controls": [
            {"controlnet": "cn_edges", "image": square_png(), "kind": "magic"}]})
        assert r.status_code == 422 and "controls[0].kind 'magic'" in r.json()["detail"]
    finally:
        worker.stop(30)


def test_controlnet_unsupported_preprocessor_and_scripts_reported(tiny):
    """Checked on the parsed request (nothing generated): a preprocessor other than none/canny
    uses the image as given and says so; other scripts and unknown unit fields are listed."""
    from sd_jax.serve import a1111
    from sd_jax.serve.app import Limits
    unit = {"image": square_png(), "module": "depth_midas", "model": "cn_edges", "control_mode": 2, "foo": 1}
    body = {"prompt": "x", "steps": 2, "width": 32, "height": 32,
            "alwayson_scripts": {"controlnet": {"args": [unit]}, "ADetailer": {"args": []}}}
    requests, settings, unsupported = a1111.parse(body, tiny, Limits(), img2img=False, model="m")
    assert unsupported == [
        "alwayson_scripts.ADetailer: script not available in sd-jax, ignored",
        "alwayson_scripts.controlnet.args[0].control_mode=2: not supported by sd-jax, ignored",
        "alwayson_scripts.controlnet.args[0].foo: unknown field, ignored",
        "alwayson_scripts.controlnet.args[0].module='depth_midas': preprocessor not available in sd-jax "
        "(only none, canny), the image is used as given"]
    (control,) = requests[0].control
    assert control.controlnet == "cn_edges" and np.array_equal(np.asarray(control.image), decode(square_png()))
    assert settings["controlnets"] == [{"module": "none", "model": "cn_edges", "weight": 1.0, "guidance_start": 0.0,
                                        "guidance_end": 1.0}]


def decode(b64) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
