"""The HTTP side of ``sd-jax serve``: a FastAPI app over a :class:`~sd_jax.serve.worker.BatchWorker`.

Routes: the AUTOMATIC1111 API under ``/sdapi/v1`` (:mod:`sd_jax.serve.a1111`), the native
``POST /v1/generate`` (its OpenAPI page at ``/docs``), ``GET /health``, ``GET /metrics``
(Prometheus text) and the web page at ``/``.  Every error is a JSON object
``{"error": ..., "detail": ...}`` with an HTTP status; no traceback ever reaches a client.
"""

import asyncio
import base64
import dataclasses
import hmac
import io
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from sd_jax.images import model_name, png_bytes
from sd_jax.request import GUIDANCE_WINDOW, RequestError
from sd_jax.serve import a1111, extras
from sd_jax.serve.worker import BatchWorker, QueueFull

log = logging.getLogger("sd_jax.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class ApiError(Exception):
    """An HTTP error with a one-line message (and optional headers)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it a request is refused before anything is allocated."""
    max_side: int = 2048
    max_steps: int = 150
    max_images: int = 16
    max_body_bytes: int = 32 * 2**20
    timeout_s: float = 600.0

    @property
    def max_pixels(self) -> int:  # an uploaded image may be larger than what is generated (it is resized)
        return 4 * self.max_side ** 2

    def check(self, width, height, steps, images) -> None:
        for side, v in (("width", width), ("height", height)):
            if v is not None and not 0 < v <= self.max_side:
                raise RequestError(f"{side} {v} is outside this server's limit (1..{self.max_side})")
        if steps is not None and not 0 < steps <= self.max_steps:
            raise RequestError(f"steps {steps} is outside this server's limit (1..{self.max_steps})")
        if not 0 < images <= self.max_images:
            raise RequestError(f"{images} images requested; this server allows 1..{self.max_images} per request")


@dataclasses.dataclass
class Server:
    """What the app serves: the worker (and its model), limits, auth and the models folder.

    loader: path -> pipeline (to switch models); precompile: callable run on the worker
    before ``/health`` says ready."""
    worker: BatchWorker
    limits: Limits = Limits()
    auth: Optional[str] = None            # "user:pass" (HTTP Basic)
    token: Optional[str] = None           # bearer token
    models_dir: Optional[str] = None
    loader: Optional[Callable[[str], Any]] = None
    model: str = ""
    ready: bool = False
    switching: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    lora_dir: Optional[str] = None        # /sdapi/v1/loras lists its files
    embeddings_dir: Optional[str] = None  # /sdapi/v1/embeddings: where the loaded embeddings came from
    allow_pickle: bool = False

    def __post_init__(self):
        self.model = self.model or model_name(self.worker.pipe.source)
        if self.worker.lora_dir is None:  # the prompts' <lora:...> tags are merged from the listed folder
            self.worker.lora_dir = self.lora_dir


# ----------------------------------------------------------------------------- ASGI middleware
def _json_bytes(status: int, error: str, detail: str) -> bytes:
    import json
    return json.dumps({"error": error, "detail": detail}).encode()


async def _send_json(send, status: int, error: str, detail: str, headers: list | None = None) -> None:
    body = _json_bytes(status, error, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """HTTP Basic / bearer authentication (every path but ``/health``) and the body-size limit."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    def _authorized(self, headers: dict) -> bool:
        s = self.server
        if not s.auth and not s.token:
            return True
        given = headers.get(b"authorization", b"").decode("latin-1")
        if s.token and given.startswith("Bearer "):
            return hmac.compare_digest(given[7:].strip().encode(), s.token.encode())
        if s.auth and given.startswith("Basic "):
            try:
                decoded = base64.b64decode(given[6:].strip(), validate=True)
            except ValueError:
                return False
            return hmac.compare_digest(decoded, s.auth.encode())
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if scope["path"] != "/health" and not self._authorized(headers):
            challenge = [(b"www-authenticate", b'Basic realm="sd-jax"')] if self.server.auth else []
            return await _send_json(send, 401, "unauthorized", "missing or wrong credentials "
                                    "(HTTP Basic user:pass or a bearer token)", challenge)
        limit = self.server.limits.max_body_bytes
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await _send_json(send, 413, "body too large", f"the body is {declared} bytes; this server "
                                    f"takes at most {limit}")
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, f"the body is over {limit} bytes, this server's limit")
            return message

        return await self.app(scope, limited, send)


# ----------------------------------------------------------------------------- the app
def create_app(server: Server):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from pydantic import BaseModel, ConfigDict
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="sd-jax", description="Stable Diffusion in JAX: native API, AUTOMATIC1111 API",
                  version="1")
    worker = server.worker
    metrics = worker.metrics

    def error(status, kind, detail, headers=None):
        return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error(e.status, _KINDS.get(e.status, "error"), str(e), e.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, e):
        return error(422, "invalid request", " ".join(str(e).split()))

    @app.exception_handler(ValueError)
    async def _value_error(request, e):  # a model-side check (pipeline.resolve, requests, memory)
        return error(422, "invalid request", " ".join(str(e).split()))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, "invalid request", f"{where}: {first.get('msg', 'invalid')}" if where
                     else first.get("msg", "invalid request"))

    @app.exception_handler(HTTPException)
    async def _http(request, e):
        return error(e.status_code, _KINDS.get(e.status_code, "error"), str(e.detail))

    @app.exception_handler(Exception)
    async def _bug(request, e):
        log.exception("internal error on %s", request.url.path)
        return error(500, "internal error", "the server failed on this request (its log says why)")

    async def body_of(request: Request) -> dict:
        import json
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    async def run_job(request: Request, requests: list):
        """Queue the images, wait for them (cancelled if the client goes or the timeout passes)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        t0 = time.perf_counter()

        def finished(job):
            try:
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))
            except RuntimeError:  # the request's event loop has ended (it timed out or was cancelled)
                pass

        try:
            job = worker.submit(requests, on_done=finished)
        except QueueFull as e:
            metrics.observe_request(429, None)
            raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from None
        deadline = t0 + server.limits.timeout_s
        while not done.done():
            try:
                await asyncio.wait_for(asyncio.shield(done), 0.1)
            except asyncio.TimeoutError:
                pass
            if done.done():
                break
            if await request.is_disconnected():
                worker.cancel(job)
                metrics.observe_request(499, None)
                raise ApiError(499, "the client went away")
            if time.perf_counter() > deadline:
                worker.cancel(job)
                metrics.observe_request(504, None)
                raise ApiError(504, f"the request took longer than {server.limits.timeout_s:g} s")
        if job.error is not None:
            metrics.observe_request(422 if isinstance(job.error, ValueError) else 500, None)
            if isinstance(job.error, ValueError):
                raise job.error
            log.error("generation failed: %r", job.error)
            raise ApiError(500, "generation failed (the server's log says why)")
        metrics.observe_request(200, time.perf_counter() - t0)
        return job

    def nsfw_flags(job) -> Optional[list]:
        """The safety checker's flag of each returned image; None when the model has no checker."""
        flags = [f for f, x in zip(job.flags, job.results) if x is not None]
        return None if all(f is None for f in flags) else flags

    def with_flag(meta: dict, flag) -> dict:  # PNG metadata: the checker's flag, as sd-jax batch writes it
        return meta if flag is None else {**meta, "nsfw_content_detected": flag}

    async def a1111_generate(request: Request, img2img: bool):
        body = await body_of(request)
        requests, settings, unsupported = await run_in_threadpool(
            a1111.parse, body, worker.pipe, server.limits, img2img=img2img, model=server.model,
            lora_dir=server.lora_dir)
        job = await run_job(request, requests)
        results = job.results
        seeds = [r.seed for r, x in zip(requests, results) if x is not None]
        nsfw = nsfw_flags(job)

        def encode():
            return [base64.b64encode(png_bytes(x, with_flag(a1111.image_meta(settings, r.seed), f))).decode()
                    for r, x, f in zip(requests, results, job.flags) if x is not None]
        images = await run_in_threadpool(encode)
        echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
        return {"images": images, "parameters": echo, "info": a1111.info(settings, seeds, nsfw),
                "unsupported": unsupported}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        return await a1111_generate(request, img2img=False)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        return await a1111_generate(request, img2img=True)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from sd_jax.diffusion.samplers import SCHEDULERS
        return a1111.sampler_names(SCHEDULERS)

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        names = list_models(server.models_dir) if server.models_dir else [server.model]
        return [{"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
                for n in names]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": server.model, "CLIP_stop_at_last_layers": 1,
                "sd_checkpoint_hash": None, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        body = await body_of(request)
        unsupported = [f"{k}: not supported by sd-jax, ignored" for k in body if k != "sd_model_checkpoint"]
        name = body.get("sd_model_checkpoint")
        if name is not None and str(name).split(" [")[0].removesuffix(".safetensors") != server.model:
            path = resolve_model(server.models_dir, name)
            if server.loader is None:
                raise ApiError(400, "this server cannot switch models")
            if not server.switching.acquire(blocking=False):
                raise ApiError(409, "another model switch is in progress")
            try:
                pipe = await run_in_threadpool(server.loader, path)
                await run_in_threadpool(worker.switch, pipe)
                server.model = model_name(path)
            finally:
                server.switching.release()
        return {"sd_model_checkpoint": server.model, "unsupported": unsupported}

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        """A1111's progress: the share of the queued images done (the running call counted by its
        step with ``--live-preview``), the seconds left at that rate, and with ``--live-preview``
        the step and an "Approx cheap" preview PNG of the running call's first image."""
        return await run_in_threadpool(progress_of, worker, not skip_current_image)

    @app.get("/sdapi/v1/loras")
    async def loras():
        return await run_in_threadpool(extras.list_loras, server.lora_dir)

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return await run_in_threadpool(extras.list_embeddings, worker.pipe, server.embeddings_dir,
                                       server.allow_pickle)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        return {"interrupted_jobs": worker.interrupt()}

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: Request):
        from PIL import Image
        body = await body_of(request)
        im = a1111.decode_image(body.get("image"), "image", server.limits.max_pixels)  # checked, size-bounded
        raw = base64.b64decode(body["image"].split(",", 1)[1] if body["image"].startswith("data:") else body["image"])
        del im
        with Image.open(io.BytesIO(raw)) as png:
            text = dict(getattr(png, "text", {}) or {})
        params = text.pop("parameters", "")
        return {"info": params, "items": text, "parameters": a1111.parse_parameters(params) if params else {}}

    class ControlIn(BaseModel):
        """One ControlNet of a native request: a ControlNet of ``--controlnet-dir`` by name."""
        model_config = ConfigDict(extra="forbid")
        controlnet: str
        image: str
        kind: str = "none"
        scale: float = 1.0
        start: float = 0.0
        end: float = 1.0

    class Generate(BaseModel):
        """``POST /v1/generate``: the Python API's arguments."""
        model_config = ConfigDict(extra="forbid")
        prompt: str
        negative_prompt: str = ""
        seed: int = 0
        num_images: int = 1
        steps: int = 30
        guidance: float = 7.5
        guidance_rescale: float = 0.0
        guidance_start: Optional[float] = None   # None: the model's (generation_defaults.json)
        guidance_end: Optional[float] = None
        width: Optional[int] = None
        height: Optional[int] = None
        scheduler: Optional[str] = None
        clip_skip: Optional[int] = None
        image: Optional[str] = None
        mask: Optional[str] = None
        strength: float = 0.8
        format: str = "json"
        controls: list[ControlIn] = []

    @app.post("/v1/generate", responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(g: Generate, request: Request):
        """Images for a prompt: JSON ``{images: [base64 PNG], seeds, parameters}``, or with
        ``"format": "png"`` (one image) the PNG itself; seeds are ``seed, seed + 1, ...``."""
        if g.format not in ("json", "png"):
            raise RequestError("format must be 'json' or 'png'")
        if g.format == "png" and g.num_images != 1:
            raise RequestError("format 'png' returns one image; ask for num_images 1 or use format 'json'")
        server.limits.check(g.width, g.height, g.steps, g.num_images)
        lim = server.limits.max_pixels
        image = a1111.decode_image(g.image, "image", lim) if g.image else None
        mask = a1111.decode_image(g.mask, "mask", lim) if g.mask else None
        decode = lambda text, what: a1111.decode_image(text, what, lim)  # noqa: E731
        units = [extras.native_unit(i, c.model_dump(), decode) for i, c in enumerate(g.controls)]
        loras = extras.prompt_loras(g.prompt, server.lora_dir)  # checked before anything is queued
        pipe = worker.pipe
        requests = pipe.requests(g.prompt, g.negative_prompt, seed=g.seed, num_inference_steps=g.steps,
                                 guidance_scale=g.guidance, guidance_rescale=g.guidance_rescale,
                                 guidance_start=g.guidance_start, guidance_end=g.guidance_end, height=g.height,
                                 width=g.width, scheduler=g.scheduler, clip_skip=g.clip_skip, image=image,
                                 mask_image=mask, strength=g.strength, num_images_per_prompt=g.num_images,
                                 **extras.control_args(units))
        job = await run_job(request, requests)
        results = job.results

        def meta(r):
            m = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed, "steps": r.steps,
                 "guidance": r.guidance, "guidance_rescale": r.guidance_rescale, "scheduler": r.scheduler,
                 "width": r.width, "height": r.height, "clip_skip": r.clip_skip, "model": server.model,
                 "generator": "sd-jax"}
            window = {k: getattr(r, k) for k in GUIDANCE_WINDOW}
            m = m if window == GUIDANCE_WINDOW else {**m, **window}
            m = {**m, "controlnets": extras.control_meta(units)} if units else m
            return {**m, "strength": r.strength, "mode": r.mode} if r.image is not None else m
        resolved = [pipe.resolve(r)[0] for r in requests]
        pngs = await run_in_threadpool(lambda: [png_bytes(x, with_flag({**meta(r), **loras}, f))
                                                for r, x, f in zip(resolved, results, job.flags) if x is not None])
        if g.format == "png":
            if not pngs:
                raise ApiError(409, "interrupted before the image was generated")
            return Response(pngs[0], media_type="image/png")
        return {"images": [base64.b64encode(p).decode() for p in pngs],
                "seeds": [r.seed for r, x in zip(resolved, results) if x is not None],
                "parameters": [{**meta(r), **loras} for r, x in zip(resolved, results) if x is not None],
                "nsfw_content_detected": nsfw_flags(job),
                "unsupported": extras.negative_lora_tags(g.negative_prompt)}

    @app.get("/health")
    async def health():
        if not server.ready:
            return error(503, "starting", "compiling the --precompile shapes")
        return {"status": "ready", "model": server.model, "queued_images": worker.queued}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return render_metrics(worker)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return f.read()

    return Guard(app, server)


_KINDS = {400: "bad request", 401: "unauthorized", 404: "not found", 405: "method not allowed", 409: "conflict",
          413: "body too large", 422: "invalid request", 429: "too many requests", 499: "client closed request",
          500: "internal error", 503: "unavailable", 504: "timeout"}


# ----------------------------------------------------------------------------- /progress
def progress_of(worker: BatchWorker, with_image: bool, wait_s: float = 1.0) -> dict:
    """``/sdapi/v1/progress`` in A1111's shape.  ``progress``: (images done + the running
    call's share of its steps) / images of the jobs not finished; ``eta_relative``: seconds
    left at the rate since the oldest job came (A1111's formula).  With ``with_image`` and a
    step monitor, a preview is asked for (copied from the next steps) and the latest returned,
    waiting up to ``wait_s`` when the running call has none yet."""
    p = worker.progress()
    monitor = worker.monitor
    snap = {"step": 0, "steps": 0, "image": None, "image_step": 0}
    if monitor is not None:
        if with_image:
            monitor.want()
        snap = monitor.snapshot(wait_s if with_image and p["jobs"] else 0.0)
    frac = snap["step"] / snap["steps"] if snap["steps"] else 0.0
    total = p["images"]
    running = min(total - p["done"], worker.max_batch) if total else 0
    share = (p["done"] + frac * running) / total if total else 0.0
    elapsed = time.perf_counter() - p["since"] if p["since"] is not None else 0.0
    eta = elapsed / share - elapsed if share > 0 else 0.0
    image = None
    if with_image and snap["image"] is not None and p["jobs"]:
        image = base64.b64encode(png_bytes(snap["image"])).decode()
    text = f"{p['done']}/{total} images" + (f", step {snap['step']}/{snap['steps']}" if snap["steps"] else "")
    return {"progress": min(share, 1.0), "eta_relative": eta,
            "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                      "job_count": p["jobs"], "job_timestamp": "0", "job_no": 0,
                      "sampling_step": snap["step"], "sampling_steps": snap["steps"],
                      "queued_images": p["queued"], "preview_step": snap["image_step"] if image else 0},
            "current_image": image, "textinfo": text if total else None}


# ----------------------------------------------------------------------------- models folder
def _is_model(path: str) -> bool:
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, f)) for f in ("model_index.json", "sd_jax.json"))
    return path.endswith(".safetensors") and os.path.isfile(path)


def list_models(models_dir: str) -> list[str]:
    """The model names in ``models_dir`` (folders and ``.safetensors`` files, name without suffix)."""
    try:
        entries = sorted(os.listdir(models_dir))
    except OSError:
        return []
    return [e.removesuffix(".safetensors") for e in entries
            if not e.startswith(".") and _is_model(os.path.join(models_dir, e))]


def resolve_model(models_dir: Optional[str], name) -> str:
    """The path of model ``name``: one of :func:`list_models` (an entry of ``models_dir`` itself,
    never a path: separators, ``..`` and hidden names are refused); an ApiError otherwise."""
    if not models_dir:
        raise ApiError(400, "this server has no --models-dir to switch models from")
    if not isinstance(name, str):
        raise ApiError(422, "sd_model_checkpoint must be a model name (see /sdapi/v1/sd-models)")
    name = name.split(" [")[0].strip().removesuffix(".safetensors")  # A1111 titles: "name [hash]"
    if not name or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ApiError(400, f"model name {name!r} must be a plain name from /sdapi/v1/sd-models")
    if name not in list_models(models_dir):
        raise ApiError(404, f"no model {name!r} in the models folder (see /sdapi/v1/sd-models)")
    path = os.path.join(models_dir, name)
    return path if os.path.isdir(path) else path + ".safetensors"


# ----------------------------------------------------------------------------- metrics
def render_metrics(worker: BatchWorker) -> str:
    """The Prometheus text exposition of the worker's counters."""
    m = worker.metrics
    lines = ["# HELP sd_jax_queue_images Images queued, not yet on the devices.", "# TYPE sd_jax_queue_images gauge",
             f"sd_jax_queue_images {worker.queued}",
             "# HELP sd_jax_images_total Images generated.", "# TYPE sd_jax_images_total counter",
             f"sd_jax_images_total {m.images}",
             "# HELP sd_jax_images_per_second Images per second over the last minute.",
             "# TYPE sd_jax_images_per_second gauge", f"sd_jax_images_per_second {m.images_per_second():.4f}",
             "# HELP sd_jax_compilations_total Programs compiled.", "# TYPE sd_jax_compilations_total counter",
             f"sd_jax_compilations_total {worker.pipe.compilations}",
             "# HELP sd_jax_batch_images Images per device call.", "# TYPE sd_jax_batch_images histogram"]
    with m.lock:
        cum = 0
        for b in (1, 2, 4, 8, 16, 32, 64, 128):
            cum = sum(c for n, c in m.batch_images.items() if n <= b)
            lines.append(f'sd_jax_batch_images_bucket{{le="{b}"}} {cum}')
        total = sum(m.batch_images.values())
        lines += [f'sd_jax_batch_images_bucket{{le="+Inf"}} {total}',
                  f"sd_jax_batch_images_sum {sum(n * c for n, c in m.batch_images.items())}",
                  f"sd_jax_batch_images_count {total}",
                  "# HELP sd_jax_request_seconds Latency of successful generation requests.",
                  "# TYPE sd_jax_request_seconds histogram"]
        cum = 0
        for b, c in zip(m.LATENCY_BUCKETS, m.latency_counts):
            cum += c
            lines.append(f'sd_jax_request_seconds_bucket{{le="{b}"}} {cum}')
        count = sum(m.latency_counts)
        lines += [f'sd_jax_request_seconds_bucket{{le="+Inf"}} {count}',
                  f"sd_jax_request_seconds_sum {m.latency_sum:.4f}", f"sd_jax_request_seconds_count {count}",
                  "# HELP sd_jax_requests_total HTTP generation requests by status.",
                  "# TYPE sd_jax_requests_total counter"]
        lines += [f'sd_jax_requests_total{{status="{s}"}} {c}' for s, c in sorted(m.requests.items())]
    return "\n".join(lines) + "\n"
