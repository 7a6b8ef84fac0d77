"""``sd-jax serve``: batching, the A1111 and native APIs, protection, a real server process.

In-process tests drive the FastAPI app with the shipped model at 64x64, 2 steps, 8 fake CPU
devices (calls of 8 rows, so the Python API's single image and a batch of the server run the
same compiled program).  Each plan is compiled once, by the Python API's reference images; the
server process reuses those programs through JAX's persistent compilation cache.
"""
import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from cli_helpers import cli_env, sd_jax_command

SHAPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")
SIZE = dict(width=64, height=64)
PROMPTS = ["a red circle", "a blue square on grey", "two green triangles"]


def b64png(arr) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def init_and_mask():
    rng = np.random.default_rng(0)
    init = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    return init, mask


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """JAX's persistent compilation cache for this module (the server process reads it)."""
    import jax
    from jax._src import compilation_cache
    path = str(tmp_path_factory.mktemp("xla-cache"))
    saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                                                "jax_persistent_cache_min_entry_size_bytes")}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path
    for k, v in saved.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def pipe(cache_dir):
    from sd_jax.commands import load_model
    return load_model(SHAPES, attention="xla")


@pytest.fixture(scope="module")
def refs(pipe):
    """The Python API's images: txt2img (one call for all prompts) and img2img with a mask (two
    plans: each compile costs ~15 s of CPU here, so the tests use no third)."""
    init, mask = init_and_mask()
    common = dict(num_inference_steps=2, guidance_scale=7.0, output_type="uint8", **SIZE)
    return {"txt2img": pipe(PROMPTS, seed=11, **common),
            "inpaint": pipe("a red circle", seed=7, image=Image.fromarray(init),
                            mask_image=Image.fromarray(mask).convert("RGB"), strength=0.75, **common)[0]}


@pytest.fixture(scope="module")
def server(pipe, refs):
    from sd_jax.serve.app import Limits, Server
    from sd_jax.serve.worker import BatchWorker
    worker = BatchWorker(pipe, max_batch=8, max_wait_ms=20, queue_size=6)
    worker.start()
    s = Server(worker, Limits(max_side=256, max_steps=50, max_images=4, max_body_bytes=2**20, timeout_s=60))
    s.ready = True
    yield s
    worker.stop(30)


def client(server, **changes):
    import dataclasses

    from fastapi.testclient import TestClient

    from sd_jax.serve.app import create_app
    return TestClient(create_app(dataclasses.replace(server, **changes)), raise_server_exceptions=False)


def txt2img_body(prompt, seed, **extra):
    return {"prompt": prompt, "seed": seed, "steps": 2, "cfg_scale": 7.0, "sampler_name": "DPM++ 2M", **SIZE, **extra}


def wait_queued(worker, n, timeout=30):
    end = time.time() + timeout
    while worker.queued < n:
        assert time.time() < end, f"{worker.queued} images queued, waited for {n}"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- batching
def test_concurrent_requests_batch_and_equal_python_api(server, refs):
    """Three requests arriving together run as one device call; each image equals the Python API's."""
    c = client(server)
    before = dict(server.worker.metrics.batch_images)
    out = {}
    with server.worker.lock:  # the worker waits: all three are queued before the next batch
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(
            i, c.post("/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[i], 11 + i)))) for i in range(3)]
        for t in threads:
            t.start()
        wait_queued(server.worker, 3)
    for t in threads:
        t.join(60)
    for i in range(3):
        r = out[i]
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(decode(r.json()["images"][0]), refs["txt2img"][i])
        info = json.loads(r.json()["info"])
        assert info["all_seeds"] == [11 + i] and info["sampler_name"] == "DPM++ 2M"
        assert "nsfw_content_detected" not in info  # the shipped model has no safety checker
    after = server.worker.metrics.batch_images
    assert after[3] == before.get(3, 0) + 1  # one call of three images
    metrics = c.get("/metrics").text
    assert 'sd_jax_batch_images_bucket{le="4"}' in metrics and "sd_jax_compilations_total" in metrics


def test_compile_does_not_stall_other_plans():
    """A plan that needs compiling is compiled on another thread; a compiled plan's images go meanwhile."""
    from sd_jax.request import GenerationRequest
    from sd_jax.serve.worker import BatchWorker

    class FakePipe:  # the pipeline's dispatch seam: plan = steps; compile blocks until released
        class mesh:
            class devices:
                size = 1
        release = threading.Event()

        def __init__(self):
            self._compiled = {(2, 1): True, (2, 2): True, (2, 4): True}
            self.compilations = 0

        def resolve(self, r, output="uint8", loop="scan"):
            return r, r.steps

        def compiled_sizes(self, plan):
            return {size for p, size in self._compiled if p == plan}

        def compile(self, plan, request, size):
            assert self.release.wait(30)
            self._compiled[(plan, size)] = True
            self.compilations += 1

        def dispatch(self, plan, requests, size=None):
            assert (plan, size) in self._compiled, "dispatched an uncompiled size"
            return np.asarray([[r.seed, plan] for r in requests] + [[0, 0]] * (size - len(requests)))

    pipe = FakePipe()
    worker = BatchWorker(pipe, max_batch=4, max_wait_ms=1, queue_size=16)
    worker.start()
    try:
        slow = worker.submit([GenerationRequest("new", seed=1, steps=3)])
        fast = worker.submit([GenerationRequest("old", seed=s, steps=2) for s in (5, 6, 7)])
        assert fast.done.wait(10) and not slow.done.is_set()
        assert [list(x) for x in fast.results] == [[5, 2], [6, 2], [7, 2]]
        cancelled = worker.submit([GenerationRequest("new", seed=9, steps=3)])
        wait_queued(worker, 2)
        worker.cancel(cancelled)  # the client went away: its image is never dispatched
        pipe.release.set()
        assert slow.done.wait(10) and list(slow.results[0]) == [1, 3] and pipe.compilations == 1
        assert cancelled.done.wait(10) and cancelled.results == [None]
    finally:
        pipe.release.set()
        worker.stop(10)


# ----------------------------------------------------------------------------- A1111 and native API
def test_img2img_with_mask_equals_python_api(server, refs):
    init, mask = init_and_mask()
    c = client(server)
    r = c.post("/sdapi/v1/img2img", json={**txt2img_body("a red circle", 7), "init_images": [b64png(init)],
                                           "mask": "data:image/png;base64," + b64png(mask),
                                           "denoising_strength": 0.75, "mask_blur": 4, "restore_faces": True})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.json()["images"][0]), refs["inpaint"])
    unsupported = " ".join(r.json()["unsupported"])
    assert "mask_blur" in unsupported and "restore_faces" in unsupported
    info = c.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()
    assert info["parameters"]["Seed"] == "7" and info["parameters"]["Denoising strength"] == "0.75"


def test_native_api_png_and_json(server, refs):
    c = client(server)
    body = {"prompt": PROMPTS[1], "seed": 12, "steps": 2, "guidance": 7.0, "scheduler": "dpmpp_2m", **SIZE}
    r = c.post("/v1/generate", json={**body, "format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")), refs["txt2img"][1])
    r = c.post("/v1/generate", json={**body, "num_images": 2})
    assert r.json()["seeds"] == [12, 13] and len(r.json()["images"]) == 2
    assert r.json()["nsfw_content_detected"] is None and r.json()["unsupported"] == []  # no safety checker
    np.testing.assert_array_equal(decode(r.json()["images"][0]), refs["txt2img"][1])
    assert not np.array_equal(decode(r.json()["images"][1]), refs["txt2img"][1])  # seed 13: another image
    assert c.get("/docs").status_code == 200 and "/v1/generate" in c.get("/openapi.json").text
    names = [s["name"] for s in c.get("/sdapi/v1/samplers").json()]
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM"} <= set(names)
    assert c.get("/health").json()["status"] == "ready"


def test_native_api_guidance_window(server, pipe):
    """guidance_start/guidance_end reach the pipeline (the same image as the Python API's) and the
    image's parameters; a bad window is a 422 naming it, refused before any work."""
    c = client(server)
    body = {"prompt": PROMPTS[0], "seed": 4, "steps": 2, "guidance": 7.0, "scheduler": "dpmpp_2m", **SIZE}
    r = c.post("/v1/generate", json={**body, "guidance_end": 0.5})
    assert r.status_code == 200, r.text
    want = pipe(PROMPTS[0], seed=4, num_inference_steps=2, guidance_scale=7.0, guidance_end=0.5,
                scheduler="dpmpp_2m", output_type="uint8", **SIZE)[0]
    np.testing.assert_array_equal(decode(r.json()["images"][0]), want)
    assert r.json()["parameters"][0]["guidance_end"] == 0.5
    compiled = server.worker.pipe.compilations
    r = c.post("/v1/generate", json={**body, "guidance_start": 0.6, "guidance_end": 0.5})
    assert r.status_code == 422 and "guidance window" in r.json()["detail"], r.text
    assert server.worker.pipe.compilations == compiled


def test_sampler_names_map_to_sd_jax():
    from sd_jax.request import canonical_scheduler
    from sd_jax.serve.a1111 import to_scheduler
    assert to_scheduler("Euler a") == "euler_a" and to_scheduler("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert to_scheduler("DPM++ 2M", "Karras") == "dpmpp_2m_karras" and to_scheduler(None) is None
    assert to_scheduler("UniPC", "automatic") == "unipc" and canonical_scheduler(to_scheduler("LMS Karras"))


# ----------------------------------------------------------------------------- faults and protection
def test_faults_are_json_errors_and_refused_before_work(server):
    c = client(server)
    compiled = server.worker.pipe.compilations

    def err(r, status, fragment):
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json") and "Traceback" not in r.text
        assert fragment in r.json()["detail"], r.json()
    err(c.post("/sdapi/v1/txt2img", content=b"{not json"), 400, "not valid JSON")
    err(c.post("/sdapi/v1/txt2img", json=txt2img_body("x", 1, width=100000, height=100000)), 422, "limit")
    err(c.post("/sdapi/v1/txt2img", json=txt2img_body("x", 1, batch_size=1000, n_iter=1000)), 422, "images")
    err(c.post("/sdapi/v1/txt2img", json=txt2img_body("x", 1, steps=10**6)), 422, "steps")
    err(c.post("/sdapi/v1/txt2img", json=txt2img_body("x", 1, sampler_name="nonsense")), 422, "scheduler")
    err(c.post("/sdapi/v1/img2img", json=txt2img_body("x", 1, init_images=["aGVsbG8="])), 422, "not a base64")
    err(c.post("/sdapi/v1/img2img", json=txt2img_body("x", 1, init_images=["%%%"])), 422, "not a base64")
    err(c.post("/v1/generate", json={"prompt": "x", "steps": "many"}), 422, "steps")
    err(c.post("/sdapi/v1/txt2img", content=b"x" * (2**20 + 1)), 413, "at most")
    err(c.get("/no/such/page"), 404, "Not Found")
    assert server.worker.pipe.compilations == compiled  # nothing was compiled (or allocated) for them

    authed = client(server, auth="user:secret")
    err(authed.get("/sdapi/v1/options", auth=("user", "wrong")), 401, "credentials")
    err(authed.get("/sdapi/v1/options"), 401, "credentials")
    assert authed.get("/sdapi/v1/options", auth=("user", "secret")).status_code == 200
    assert authed.get("/health").status_code == 200  # load balancers probe without credentials
    tokened = client(server, token="t0ken")
    err(tokened.get("/metrics", headers={"Authorization": "Bearer nope"}), 401, "credentials")
    assert tokened.get("/metrics", headers={"Authorization": "Bearer t0ken"}).status_code == 200


def test_queue_flood_429_then_still_serving(server, refs):
    """Beyond the queue (6 images) requests get 429 with Retry-After; the queued ones complete."""
    c = client(server)
    out = []
    with server.worker.lock:
        threads = [threading.Thread(target=lambda i=i: out.append(
            c.post("/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11, batch_size=2)))) for i in range(3)]
        for t in threads:
            t.start()
        wait_queued(server.worker, 6)
        flood = [c.post("/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11)) for _ in range(3)]
        timed_out = client(server, limits=server.limits.__class__(timeout_s=0.3)).post(
            "/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11))
    for t in threads:
        t.join(60)
    for r in flood:
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1 and "busy" in r.json()["detail"]
    assert timed_out.status_code == 429  # the queue was full for it too
    for r in out:
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(decode(r.json()["images"][0]), refs["txt2img"][0])
    r = c.post("/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11))
    assert r.status_code == 200
    assert 'sd_jax_requests_total{status="429"}' in c.get("/metrics").text


def test_timeout_and_interrupt(server):
    c = client(server)
    slow = client(server, limits=server.limits.__class__(timeout_s=0.3))
    with server.worker.lock:
        r = slow.post("/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11))
        assert r.status_code == 504 and "longer than" in r.json()["detail"]
        out = []
        t = threading.Thread(target=lambda: out.append(c.post("/sdapi/v1/txt2img", json=txt2img_body("x", 3))))
        t.start()
        wait_queued(server.worker, 2)  # the timed-out image (cancelled) and this one
        assert c.post("/sdapi/v1/interrupt").json()["interrupted_jobs"] >= 1
    t.join(60)
    assert out[0].status_code == 200 and out[0].json()["images"] == []


def test_models_dir_switch_and_traversal(server, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(SHAPES, models / "other")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "model_index.json").write_text("{}")
    (models / "notes.txt").write_text("not a model")
    from sd_jax.commands import load_model
    c = client(server, models_dir=str(models), loader=lambda p: load_model(p, attention="xla"))
    assert [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()] == ["other"]
    for name, status in (("../secret", 400), ("..", 400), ("/etc", 400), ("other/../../secret", 400),
                         (".hidden", 400), ("notes.txt", 404), ("missing", 404), (["other"], 422)):
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": name})
        assert r.status_code == status and "error" in r.json(), (name, r.text)
    original = server.worker.pipe
    try:
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other [abc]"})
        assert r.status_code == 200 and r.json()["sd_model_checkpoint"] == "other"
        assert server.worker.pipe is not original
    finally:
        server.worker.switch(original)


# ----------------------------------------------------------------------------- a real server process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cache_dir, cwd=None):
    """``sd-jax serve`` in a subprocess (8 fake devices, this module's compilation cache), once
    /health says ready: (process, port, url)."""
    import httpx
    port = free_port()
    env = cli_env(8, {"SD_JAX_CACHE": cache_dir, "JAX_DEFAULT_MATMUL_PRECISION": "highest",
                      "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")})
    proc = subprocess.Popen(sd_jax_command() + ["serve", "--model", SHAPES, "--port", str(port), "--precompile",
                                                "64x64:2", "--max-batch", "8", "--max-wait-ms", "600",
                                                "--attention", "xla"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 240
    while True:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, "the server did not become ready"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return proc, port, url


@pytest.fixture(scope="module")
def served(refs, cache_dir):
    proc, port, url = start_server(cache_dir)
    yield proc, port, url
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_served_sigkill_then_restart_serves_again(refs, cache_dir, tmp_path):
    """SIGKILL (no clean-up at all), then a new ``sd-jax serve``: ready again and answering as
    before; the server wrote no file of its own (nothing can be left half-written)."""
    import httpx
    proc, _, url = start_server(cache_dir, cwd=tmp_path)
    proc.kill()
    proc.wait()
    assert os.listdir(tmp_path) == []
    proc, _, url = start_server(cache_dir, cwd=tmp_path)
    try:
        r = httpx.post(url + "/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11), timeout=120)
        assert r.status_code == 200
        np.testing.assert_array_equal(decode(r.json()["images"][0]), refs["txt2img"][0])
    finally:
        proc.kill()
        proc.wait()
    assert os.listdir(tmp_path) == []


def test_served_webuiapi_and_sd_parsers(served, refs):
    """A real A1111 client (webuiapi) against the server: txt2img and img2img (with a mask) equal the
    Python API's images; sd-parsers reads their metadata."""
    import webuiapi
    from sd_parsers import ParserManager
    proc, port, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="DPM++ 2M", steps=2)
    r = api.txt2img(prompt=PROMPTS[0], seed=11, cfg_scale=7.0, **SIZE)
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), refs["txt2img"][0])
    assert r.info["all_seeds"] == [11]
    parsed = ParserManager().parse(r.image)
    assert parsed.generator.value == "AUTOMATIC1111"
    sampler = parsed.samplers[0]
    assert sampler.name == "DPM++ 2M" and sampler.parameters["seed"] == "11" and sampler.parameters["steps"] == "2"
    assert sampler.prompts[0].value == PROMPTS[0] and sampler.model.name == "sd-jax-shapes"
    init, mask = init_and_mask()
    r = api.img2img(images=[Image.fromarray(init)], mask_image=Image.fromarray(mask), prompt="a red circle", seed=7,
                    cfg_scale=7.0, denoising_strength=0.75, **SIZE)
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), refs["inpaint"])


def test_served_web_page_in_browser(served, tmp_path):
    """Chromium (headless, Selenium) types a prompt, presses Generate and sees the image."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait
    _, _, url = served
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(url + "/")
        driver.find_element(By.ID, "prompt").send_keys(PROMPTS[0])
        for field, value in (("width", "64"), ("height", "64"), ("steps", "2"), ("seed", "11")):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
        WebDriverWait(driver, 10).until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 1)
        Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("DPM++ 2M")
        driver.find_element(By.ID, "generate").click()
        img = WebDriverWait(driver, 60).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#images img.result")))
        assert img.get_attribute("src").startswith("data:image/png;base64,")
        link = driver.find_element(By.CSS_SELECTOR, "#images a")
        assert link.get_attribute("download") == "sd-jax-11.png"
        assert "done: 1 image" in driver.find_element(By.ID, "status").text
        shot = tmp_path / "web_page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
    finally:
        driver.quit()


def test_served_client_going_away_cancels_its_request(served):
    """A client that disconnects while its request waits (the server's 600 ms batching window): the
    request is cancelled (status 499 in the metrics), and the server keeps serving."""
    import httpx
    _, _, url = served
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11),
                   timeout=httpx.Timeout(10, read=0.1))
    end = time.time() + 10
    while 'sd_jax_requests_total{status="499"} 1' not in httpx.get(url + "/metrics").text:
        assert time.time() < end, httpx.get(url + "/metrics").text
        time.sleep(0.05)
    assert httpx.post(url + "/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11), timeout=60).status_code == 200


def test_served_sigterm_finishes_requests_in_flight(served):
    """SIGTERM while a request waits: it is answered (200, its image), then the server exits 0."""
    import httpx
    proc, _, url = served
    out = []
    t = threading.Thread(target=lambda: out.append(
        httpx.post(url + "/sdapi/v1/txt2img", json=txt2img_body(PROMPTS[0], 11), timeout=120)))
    t.start()
    end = time.time() + 30
    while httpx.get(url + "/sdapi/v1/progress").json()["state"]["job_count"] < 1:
        assert time.time() < end
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert out and out[0].status_code == 200 and len(out[0].json()["images"]) == 1
    assert proc.wait(60) == 0
    err = proc.stderr.read()
    assert "server stopped (SIGTERM)" in err and "Traceback" not in err


def test_serve_command_user_errors(capsys, tmp_path):
    """Mistakes in the command line are one line each, before the model loads."""
    from sd_jax.cli import main
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        for args, fragment in ((["--api-auth", "nocolon"], "USER:PASSWORD"),
                               (["--precompile", "64x64:x"], "--precompile"),
                               (["--max-batch", "0"], "--max-batch"),
                               (["--models-dir", str(tmp_path / "none")], "--models-dir"),
                               (["--port", str(busy)], "cannot listen")):
            assert main(["serve", "--model", SHAPES, *args]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("sd-jax: error: ") and fragment in err[0], err
