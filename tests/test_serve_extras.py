"""``sd-jax serve`` and the features that landed after it: ``/sdapi/v1/loras``,
``/sdapi/v1/embeddings``, ``<lora:...>`` tags reported as not applied, and the safety
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


def test_lora_tags_reported_not_applied(shipped):
    """The server does not merge LoRAs per request: a prompt's tags are listed in
    ``unsupported`` (checked here on the parsed request: nothing is generated)."""
    from sd_jax.serve import a1111
    from sd_jax.serve.app import Limits
    body = {"prompt": "a cat <lora:ink:0.8> <lora:detail>", "negative_prompt": "blurry <lora:neg:-1>",
            "steps": 2, "width": 64, "height": 64, "seed": 3}
    requests, _, unsupported = a1111.parse(body, shipped, Limits(), img2img=False, model="m")
    assert [u.split(":", 3)[:3] for u in unsupported] == [["<lora", "ink", "0.8>"], ["<lora", "detail", "1>"],
                                                          ["<lora", "neg", "-1>"]]
    assert all("not applied" in u for u in unsupported)
    plain = a1111.parse({**body, "prompt": "a cat", "negative_prompt": ""}, shipped, Limits(), img2img=False,
                        model="m")[2]
    assert plain == [] and requests[0].prompt == body["prompt"]


def test_serve_folder_flags_checked_before_loading(tmp_path, capsys):
    from sd_jax import cli
    for flag in ("--lora-dir", "--embeddings-dir"):
        missing = str(tmp_path / "nope")
        assert cli.main(["serve", "--port", "0", flag, missing]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"sd-jax: error: {flag} {missing!r} is not a folder"]


# ----------------------------------------------------------------------------- the safety checker
def test_safety_flags_in_responses(tmp_path):
    """A tiny SD1 folder with a tiny checker (``--safety-policy keep``: the images come back as
    the checker saw them).  Its concept 3 is then set to the first image's embedding, between
    the two images' cosine and 1: the same images come back flagged [True, False] (the
    checker's parameters are an input of the compiled program: nothing recompiles), in A1111's
    ``info``, the native ``nsfw_content_detected`` and each PNG's metadata; equal to the
    checker's own verdict on the returned images."""
    import jax
    import jax.numpy as jnp

    from sd_jax import sharding
    from sd_jax.images import read_metadata
    from sd_jax.pipeline import StableDiffusionPipeline
    from test_safety_checker import build_checker
    from tiny_models import build_tiny_pipeline
    build_tiny_pipeline(str(tmp_path))
    build_checker(tmp_path, size=32)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"])
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path), mesh=one_device(), safety_policy="keep")
    assert pipe.safety_checker is not None
    c, worker = client_for(pipe)
    worker.start()
    try:
        body = {"prompt": "a red circle", "seed": 5, "steps": 2, "width": 32, "height": 32, "batch_size": 2,
                "cfg_scale": 1.0}  # unguided: the smaller program to compile
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
                                              "height": 32, "num_images": 2, "guidance": 1.0}).json()
        assert native["nsfw_content_detected"] == want
        for b, image, flag in zip(native["images"], images, want):
            np.testing.assert_array_equal(decode(b), image)
            assert read_metadata(io.BytesIO(base64.b64decode(b)))["nsfw_content_detected"] == flag
    finally:
        worker.stop(30)


def decode(b64) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
