"""``sd-jax serve``: ``<lora:name:w>`` tags applied per request (batched by LoRA set), and
``/sdapi/v1/progress`` with per-step progress and an "Approx cheap" preview (``--live-preview``).

In-process (FastAPI's TestClient) with the shipped model at 64x64, 2 steps, on one device; every
device call has 2 rows (the Python API's references are pairs of images), so the references and
the server run one compiled program, and ``--live-preview`` a second one.  LoRA files: kohya keys
on the UNet's cross-attention kernels with random factors (tests/test_lora_prompts.py's builder).
"""
import base64
import io
import json
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_lora_prompts import SHIPPED, _addnet_hash, _kohya

PROMPT = "a red circle"
TAGGED = "a red circle <lora:x:0.7>"
COMMON = dict(num_inference_steps=2, height=64, width=64, guidance_scale=7.0, output_type="uint8")


def decode(b64) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def body(prompt, seed, **extra):
    return {"prompt": prompt, "seed": seed, "steps": 2, "cfg_scale": 7.0, "width": 64, "height": 64, **extra}


@pytest.fixture(scope="module")
def pipe():
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(SHIPPED, mesh=sharding.make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="module")
def loras(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    (folder / "styles").mkdir()
    return {"dir": str(folder), "x": _kohya(folder / "x.safetensors", pipe.params["unet"], 1),
            "y": _kohya(folder / "styles" / "y.safetensors", pipe.params["unet"], 2)}


@pytest.fixture(scope="module")
def refs(pipe, loras):
    """The Python API's images, two per call (seeds 3, 4 and 5, 6): one compiled program."""
    two = dict(num_images_per_prompt=2, **COMMON)
    out = {"x34": np.asarray(pipe(TAGGED, seed=3, lora_dir=loras["dir"], **two)),
           "plain56": np.asarray(pipe(PROMPT, seed=5, **two)), "plain34": np.asarray(pipe(PROMPT, seed=3, **two))}
    assert not pipe.loras.weights and pipe.compilations == 1
    return out


def serving(pipe, lora_dir, **worker):
    from fastapi.testclient import TestClient

    from sd_jax.serve.app import Limits, Server, create_app
    from sd_jax.serve.worker import BatchWorker
    w = BatchWorker(pipe, max_batch=4, max_wait_ms=5, queue_size=8, **worker)
    s = Server(w, Limits(max_side=128, max_steps=10, max_images=4, timeout_s=120), lora_dir=lora_dir)
    s.ready = True
    return TestClient(create_app(s), raise_server_exceptions=False), w


def wait_queued(worker, n, timeout=30):
    end = time.time() + timeout
    while worker.queued < n:
        assert time.time() < end, f"{worker.queued} images queued, waited for {n}"
        time.sleep(0.01)


def concurrently(c, worker, bodies):
    """POST the A1111 bodies together (queued while the worker waits); the responses in order."""
    out = {}
    with worker.lock:
        threads = [threading.Thread(target=lambda i=i, b=b: out.__setitem__(i, c.post("/sdapi/v1/txt2img", json=b)))
                   for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        wait_queued(worker, len(bodies))
    for t in threads:
        t.join(120)
    return [out[i] for i in range(len(bodies))]


# ----------------------------------------------------------------------------- LoRA tags
def test_tags_applied_batched_by_lora_set_equal_python_api(pipe, loras, refs):
    """Four requests arriving together, two with ``<lora:x:0.7>`` and two without, run as two
    calls of two (one per LoRA set; no compilation); each image equals the Python API's for the
    same prompt, seed and tag; ``info`` and the PNGs carry A1111's ``Lora hashes``."""
    assert not np.array_equal(refs["x34"], refs["plain34"])  # the LoRA changes the images
    c, worker = serving(pipe, loras["dir"])
    worker.start()
    n = pipe.compilations
    try:
        rs = concurrently(c, worker, [body(TAGGED, 3), body(PROMPT, 5), body(TAGGED, 4), body(PROMPT, 6)])
        for r, want in zip(rs, (refs["x34"][0], refs["plain56"][0], refs["x34"][1], refs["plain56"][1])):
            assert r.status_code == 200, r.text
            np.testing.assert_array_equal(decode(r.json()["images"][0]), want)
            assert r.json()["unsupported"] == []
        assert dict(worker.metrics.batch_images) == {2: 2} and pipe.compilations == n
        hashes = f"x: {_addnet_hash(loras['x'])}"
        info = json.loads(rs[0].json()["info"])
        assert info["extra_generation_params"] == {"Lora hashes": hashes}
        assert info["infotexts"][0].startswith(TAGGED + "\n") and f'Lora hashes: "{hashes}"' in info["infotexts"][0]
        png = c.post("/sdapi/v1/png-info", json={"image": rs[2].json()["images"][0]}).json()
        assert png["parameters"]["Lora hashes"] == hashes and png["parameters"]["Prompt"] == TAGGED
        assert "Lora hashes" not in json.loads(rs[1].json()["info"])["extra_generation_params"]

        # the native API: the same tag, the same images; its metadata as sd-jax generate's
        r = c.post("/v1/generate", json={"prompt": TAGGED, "seed": 3, "num_images": 2, "steps": 2, "guidance": 7.0,
                                         "width": 64, "height": 64, "negative_prompt": "<lora:y:1>"})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.stack([decode(b) for b in r.json()["images"]]), refs["x34"])
        assert r.json()["parameters"][0]["loras"] == {"x": 0.7}
        assert r.json()["parameters"][0]["lora_hashes"] == {"x": _addnet_hash(loras["x"])}
        assert r.json()["unsupported"] == ["<lora:y:1> in negative_prompt: LoRA tags apply from the prompt only, ignored"]
    finally:
        worker.stop(30)
        pipe.unload_lora()


def test_unknown_lora_refused_listing_and_override_settings(pipe, loras):
    """An unknown name or a server without ``--lora-dir``: HTTP 422 with one line naming the
    folder, before anything is queued.  ``/sdapi/v1/loras`` lists the folder.  A1111's
    ``override_settings.sd_lora`` adds its tag at ``extra_networks_default_multiplier``."""
    from sd_jax.serve import a1111
    from sd_jax.serve.app import Limits
    c, worker = serving(pipe, loras["dir"])  # not started: nothing may reach it
    r = c.post("/sdapi/v1/txt2img", json=body("a cat <lora:nope:0.5>", 1))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail == f"no LoRA named 'nope' in {loras['dir']} (it has: x, y)" and "\n" not in detail
    r = c.post("/v1/generate", json={"prompt": "a cat <lora:nope>", "steps": 2, "width": 64, "height": 64})
    assert r.status_code == 422 and r.json()["detail"] == detail
    bare, _ = serving(pipe, None)
    r = bare.post("/sdapi/v1/txt2img", json=body("a cat <lora:x:0.5>", 1))
    assert r.status_code == 422
    assert r.json()["detail"] == ("the prompt's <lora:x:0.5>: this server has no LoRA folder "
                                  "(start it with --lora-dir FOLDER)")
    assert worker.queued == 0 and worker.metrics.images == 0

    listed = c.get("/sdapi/v1/loras").json()
    assert [(e["name"], e["path"]) for e in listed] == [("x", loras["x"]), ("y", loras["y"])]

    over = {"sd_lora": "y", "extra_networks_default_multiplier": 0.5}
    requests, settings, unsupported = a1111.parse(body("a cat", 2, override_settings=over), pipe, Limits(),
                                                  img2img=False, model="m", lora_dir=loras["dir"])
    assert requests[0].prompt == "a cat<lora:y:0.5>" and settings["loras"] == {"y": 0.5}
    assert settings["lora_hashes"] == {"y": _addnet_hash(loras["y"])} and unsupported == []
    named = a1111.parse(body("a cat <lora:y:0.2>", 2, override_settings=over), pipe, Limits(), img2img=False,
                        model="m", lora_dir=loras["dir"])
    assert named[0][0].prompt == "a cat <lora:y:0.2>"  # as A1111: not added twice


# ----------------------------------------------------------------------------- /progress
def test_progress_steps_and_preview_while_generating(pipe, loras, refs):
    """``--live-preview``: while a call runs (held inside its preview callback), ``/progress``
    gives A1111's step, progress, eta and the preview PNG (the latent grid's size); the images
    equal the Python API's (the callbacks only read the latents); nothing is copied when
    no client asks (one scalar callback per step)."""
    c, worker = serving(pipe, loras["dir"], live_preview=True)
    monitor = worker.monitor
    monitor.window_s = 600  # the first /progress keeps asking through the (slow) compilation
    reached, go = queue.Queue(), {1: threading.Event(), 2: threading.Event()}
    store = monitor._store

    def held(rgb):  # the device call waits here after each copy until the test lets it go
        store(rgb)
        reached.put(monitor.image_step)
        go[monitor.image_step].wait(60)
    monitor._store = held
    worker.start()
    try:
        idle = c.get("/sdapi/v1/progress").json()  # asks for previews from now on
        assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["sampling_steps"] == 0
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", c.post("/sdapi/v1/txt2img", json=body(TAGGED, 3, batch_size=2))))
        t.start()
        seen = []
        for step in (1, 2):
            assert reached.get(timeout=120) == step
            p = c.get("/sdapi/v1/progress").json()
            go[step].set()
            seen.append(p)
            assert (p["state"]["sampling_step"], p["state"]["sampling_steps"]) == (step, 2)
            assert p["progress"] == pytest.approx(step / 2) and p["eta_relative"] >= 0
            side = 64 // pipe.models.vae_scale  # the latent grid
            assert decode(p["current_image"]).shape == (side, side, 3)
            assert p["textinfo"] == f"0/2 images, step {step}/2"
        assert seen[0]["eta_relative"] > 0
        assert c.get("/sdapi/v1/progress?skip_current_image=true").json()["current_image"] is None
        t.join(120)
        r = result["r"]
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(np.stack([decode(b) for b in r.json()["images"]]), refs["x34"])
        done = c.get("/sdapi/v1/progress").json()
        assert done["state"]["job_count"] == 0 and done["current_image"] is None and done["progress"] == 0

        monitor._wanted_until = 0.0  # nobody asks: the steps are counted, nothing is copied
        ticks, copies = monitor.ticks, monitor.copies
        r = c.post("/sdapi/v1/txt2img", json=body(PROMPT, 3, batch_size=2))
        np.testing.assert_array_equal(np.stack([decode(b) for b in r.json()["images"]]), refs["plain34"])
        assert (monitor.ticks - ticks, monitor.copies - copies) == (2, 0)
    finally:
        for e in go.values():
            e.set()
        worker.stop(30)
        pipe.preview = None
        pipe.unload_lora()


def test_preview_hook_is_the_cheap_map_of_the_latents():
    """The plan hook on :func:`sample` with a linear denoiser: a tick per step; when asked, the
    preview of the last step is A1111's cheap map of the final latents, of the others that of
    the next step's model input (``x / sqrt(sigma^2 + 1)``); the latents are unchanged."""
    import types

    from sd_jax.diffusion import SchedulerConfig, make_sampler
    from sd_jax.diffusion.sampling import sample
    from sd_jax.serve.preview import SD_COEFFS, SDXL_COEFFS, StepMonitor, cheap_rgb
    sampler = make_sampler("euler", SchedulerConfig(), 3)
    x0 = jax.random.normal(jax.random.key(0), (2, 4, 4, 4)) * sampler.init_noise_sigma
    model = lambda x, t, i: 0.3 * x  # noqa: E731
    monitor = StepMonitor()
    hook = monitor.plan_hook("sd1", 4)
    assert hook is monitor.plan_hook("sd1", 4) and hook.coeffs == SD_COEFFS
    assert monitor.plan_hook("sdxl", 4).coeffs == SDXL_COEFFS
    plan = types.SimpleNamespace(start=0, end=3)
    run = jax.jit(lambda x: sample(model, sampler, x, post_step=hook.post_step(None, sampler, plan))[0])
    want = sample(model, sampler, x0)[0]
    np.testing.assert_array_equal(np.asarray(run(x0)), np.asarray(want))
    assert (monitor.ticks, monitor.copies, monitor.step, monitor.steps) == (3, 0, 3, 3)
    monitor.want()
    run(x0).block_until_ready()
    assert monitor.copies == 3 and monitor.image_step == 3
    assert np.abs(monitor.image.astype(int) - cheap_rgb(np.asarray(want[0]), SD_COEFFS).astype(int)).max() <= 1
    two = sample(model, sampler, x0, end=2)[0]
    shown = sampler.scale_model_input(two, 2)
    expected = cheap_rgb(np.asarray(shown[0]), SD_COEFFS)
    seen = []
    monitor._store = lambda rgb: seen.append(np.asarray(rgb))  # traced again: a new jit of the same hook
    jax.jit(lambda x: sample(model, sampler, x, post_step=hook.post_step(None, sampler, plan))[0])(x0)
    assert len(seen) == 3 and np.abs(seen[1].astype(int) - expected.astype(int)).max() <= 1
    assert cheap_rgb(jnp.zeros((1, 1, 4)), SD_COEFFS).tolist() == [[[128, 128, 128]]]
