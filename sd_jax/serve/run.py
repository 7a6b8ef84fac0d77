"""``sd-jax serve``: compile the listed shapes, serve a loaded model until SIGTERM.

``sd_jax.commands.serve`` checks the arguments (:func:`check_args`, before the slow model
load), loads the model and calls :func:`serve`.  Errors a user can fix are ValueErrors with a
one-line message.

uvicorn handles SIGTERM and SIGINT: it stops accepting connections, waits for the requests in
flight to be answered, then returns; the batch worker then finishes whatever is still queued.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading

import uvicorn

from sd_jax.images import model_name
from sd_jax.request import Dispatcher, GenerationRequest, bucket_sizes, parse_size
from sd_jax.serve.app import ApiError, Limits, Server, create_app, resolve_model
from sd_jax.serve.worker import BatchWorker


class UsageError(ValueError):
    """A mistake in ``sd-jax serve``'s arguments; the message says what to do."""


def parse_precompile(text: str | None) -> list[tuple[int, int, int]]:
    """``"512x512:20,768x768:30"`` -> [(width, height, steps), ...]."""
    out = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        size, _, steps = part.partition(":")
        try:
            w, h = parse_size(size)
            n = int(steps) if steps else 30
        except ValueError as e:
            raise UsageError(f"--precompile {part!r}: {e}; write WxH:STEPS, e.g. 512x512:20") from None
        if n < 1:
            raise UsageError(f"--precompile {part!r}: steps must be at least 1")
        out.append((w, h, n))
    return out


def check_args(args) -> list[tuple[int, int, int]]:
    """Everything that needs no model, before the (slow) model load; returns the
    ``--precompile`` shapes.  ``--model NAME`` with ``--models-dir`` becomes that model's path."""
    for flag in ("max_batch", "queue_size", "max_side", "max_steps", "max_images", "max_body_mb"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_wait_ms < 0 or args.timeout <= 0:
        raise UsageError("--max-wait-ms must be >= 0 and --timeout > 0")
    if args.api_auth is not None and (":" not in args.api_auth or args.api_auth.startswith(":")):
        raise UsageError("--api-auth takes USER:PASSWORD")
    if args.api_auth and args.api_token:
        raise UsageError("give --api-auth or --api-token, not both")
    if args.models_dir is not None and not os.path.isdir(args.models_dir):
        raise UsageError(f"--models-dir {args.models_dir!r} is not a folder")
    for flag in ("lora_dir", "embeddings_dir", "controlnet_dir"):
        folder = getattr(args, flag, None)
        if folder is not None and not os.path.isdir(folder):
            raise UsageError(f"--{flag.replace('_', '-')} {folder!r} is not a folder")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    try:  # a port in use is found before the (slow) model load
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); "
                         f"choose another --port or --host") from None
    shapes = parse_precompile(args.precompile)
    limits = limits_of(args)
    for w, h, _ in shapes:
        limits.check(w, h, None, 1)
    if args.models_dir and args.model and not os.path.exists(args.model):
        try:  # --model NAME inside --models-dir
            args.model = resolve_model(args.models_dir, args.model)
        except ApiError as e:
            raise UsageError(f"--model {args.model!r}: {e}") from None
    return shapes


def limits_of(args) -> Limits:
    return Limits(max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                  max_body_bytes=args.max_body_mb * 2**20, timeout_s=args.timeout)


def serve(args, pipe, shapes: list, loader) -> int:
    """Serve ``pipe`` as ``args`` say until SIGTERM/SIGINT; ``loader``: path -> pipeline (for
    ``/sdapi/v1/options``)."""
    pipe.memory_check = not args.no_memory_check
    worker = BatchWorker(pipe, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                         lora_dir=getattr(args, "lora_dir", None), live_preview=getattr(args, "live_preview", False))
    server = Server(worker, limits_of(args), auth=args.api_auth, token=args.api_token, models_dir=args.models_dir,
                    loader=loader, model=model_name(pipe.source), lora_dir=getattr(args, "lora_dir", None),
                    embeddings_dir=getattr(args, "embeddings_dir", None),
                    allow_pickle=getattr(args, "allow_pickle", False))
    where = f"http://{args.host}:{args.port}"

    def precompile():
        try:
            with worker.lock:  # the worker waits: the pipeline's compiled table changes here
                for w, h, steps in shapes:
                    # Every call size the batcher uses, compiled and run once: a program's first
                    # run is slower (buffers, thread pools), and that should not be a client's.
                    for size in bucket_sizes(pipe.mesh.devices.size, args.max_batch):
                        Dispatcher(pipe, batch_size=size).generate(
                            [GenerationRequest("", steps=steps, width=w, height=h)] * size)
        except Exception as e:  # a shape that cannot be compiled: say so, keep serving the rest
            print(f"sd-jax: warning: --precompile failed: {' '.join(str(e).split())}", file=sys.stderr)
        server.ready = True
        print(f"sd-jax: serving {server.model} on {where} (ready; {pipe.compilations} program(s) compiled)",
              file=sys.stderr, flush=True)

    worker.start()
    threading.Thread(target=precompile, name="sd-jax-precompile", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="sd-jax: %(message)s")
    config = uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=None, access_log=False)
    http = _GracefulServer(config)
    try:
        http.run()
    finally:
        worker.stop()
    names = ", ".join(signal.Signals(s).name for s in http.stopped_by)
    print(f"sd-jax: server stopped{f' ({names})' if names else ''}", file=sys.stderr)
    return 0


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, but a SIGTERM/SIGINT that stopped it gracefully is not raised again
    afterwards (uvicorn does, ending the process by the signal): the batch worker still has to
    stop, and the command ends with status 0."""
    stopped_by: list = []

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", [])  # uvicorn >= 0.29 raises these again
                self.stopped_by = list(captured)
                captured.clear()
