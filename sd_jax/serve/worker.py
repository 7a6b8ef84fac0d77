"""Dynamic batching: one worker thread gathers the images of concurrent requests into device calls.

Each HTTP request becomes a :class:`Job` holding one :class:`~sd_jax.request.GenerationRequest`
per image.  The :class:`BatchWorker` thread takes the queued images in arrival order, waits up
to ``max_wait_ms`` for more to arrive (or until ``max_batch`` are waiting), and hands them to the
library's :class:`~sd_jax.request.Dispatcher`, which groups them by static settings (plan),
pads each call to a bucket size and keeps one call queued on the devices while the previous one
is collected.  An image depends only on its own request (prompt, seed, settings), never on what
it was batched with, because every sample's noise comes from its own seed.

A plan that has no compiled call size yet is compiled on a separate thread, so images of
already-compiled plans keep flowing meanwhile; the images waiting for it join the queue again
once it is compiled.  All changes to the pipeline's table of compiled programs happen on the
worker thread (the compile thread fills a table of its own, merged by the worker).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import threading
import time
from typing import Callable, Optional

from sd_jax.lora import prompts as lora_prompts
from sd_jax.request import Dispatcher, GenerationRequest, RequestError, bucket_sizes
from sd_jax.serve.preview import StepMonitor

log = logging.getLogger("sd_jax.serve")


class QueueFull(Exception):
    """The queue holds too many images; ``retry_after``: seconds a client should wait."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(eq=False)
class Job:
    """The images of one HTTP request.  ``results[i]``: uint8 [H, W, 3] once generated (None if
    it was not: cancelled, interrupted or failed).  ``on_done`` is called once, from the worker
    thread, when no image of the job is left queued or on the devices."""
    requests: list
    results: list = dataclasses.field(default_factory=list)
    error: Optional[BaseException] = None
    cancelled: bool = False      # the client went away or timed out: nothing more is dispatched
    interrupted: bool = False    # /interrupt: the images not dispatched yet are skipped
    created: float = dataclasses.field(default_factory=time.perf_counter)
    on_done: Optional[Callable[["Job"], None]] = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    _open: int = 0               # images queued or on the devices
    flags: list = dataclasses.field(default_factory=list)  # the safety checker's, per image (None: not run)

    @property
    def finished_images(self) -> int:
        return sum(r is not None for r in self.results)


class Metrics:
    """Counters for ``/metrics`` (Prometheus text format) and ``/progress``."""
    LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self):
        self.lock = threading.Lock()
        self.images = 0
        self.batches: collections.Counter = collections.Counter()  # padded call size -> calls
        self.batch_images: collections.Counter = collections.Counter()  # images in a call -> calls
        self.latency_counts = [0] * (len(self.LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.requests: collections.Counter = collections.Counter()  # HTTP status -> requests
        self.recent: collections.deque = collections.deque()  # (time, images) over the last minute

    def observe_call(self, images: int, size: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.images += images
            self.batches[size] += 1
            self.batch_images[images] += 1
            self.recent.append((now, images))
            while self.recent and self.recent[0][0] < now - 60:
                self.recent.popleft()

    def observe_request(self, status: int, seconds: float | None) -> None:
        with self.lock:
            self.requests[status] += 1
            if seconds is not None:
                i = next((k for k, b in enumerate(self.LATENCY_BUCKETS) if seconds <= b), len(self.LATENCY_BUCKETS))
                self.latency_counts[i] += 1
                self.latency_sum += seconds

    def images_per_second(self) -> float:
        with self.lock:
            if not self.recent:
                return 0.0
            span = max(time.perf_counter() - self.recent[0][0], 1.0)
            return sum(n for _, n in self.recent) / span


class BatchWorker:
    """Runs :class:`Job` s on a pipeline from one thread, batching images across jobs.

    max_batch: images per device call (over all devices); max_wait_ms: how long the first
    queued image waits for others; queue_size: images queued (not yet on the devices) beyond
    which :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, pipe, *, max_batch: int = 8, max_wait_ms: float = 20.0, queue_size: int = 64,
                 lora_dir: Optional[str] = None, live_preview: bool = False):
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be at least 1, max_wait_ms at least 0")
        self.pipe = pipe
        self.lora_dir = lora_dir  # where the prompts' <lora:name:w> tags are looked up
        self._loras: dict = {}      # id(pipe) -> (its own LoRAs, the tags merged now, the params they gave)
        # per-step progress and previews (sd_jax.serve.preview): host callbacks in every plan
        self.monitor = StepMonitor() if live_preview else None
        if self.monitor is not None:
            pipe.preview = self.monitor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.metrics = Metrics()
        # Held while a batch runs; taken to swap the model (/options) between batches.
        self.lock = threading.Lock()
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (job, index) of images to dispatch
        self._parked: dict = {}     # (plan, size) being compiled -> [(job, index)]
        self._compiled_by_thread: list = []  # (shadow pipeline, error) from compile threads
        self._jobs: set = set()     # jobs not done
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.busy_seconds = 0.0

    # ------------------------------------------------------------------ client side
    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue) + sum(len(v) for v in self._parked.values())

    def retry_after(self, images: int = 1) -> int:
        rate = self.metrics.images_per_second()
        return max(1, math.ceil((self.queued + images) / rate)) if rate > 0 else 5

    def submit(self, requests: list, on_done: Optional[Callable] = None) -> Job:
        """Queue one job (its requests resolved against the model first: a RequestError for one
        that this model cannot do, before anything is queued)."""
        if not requests:
            raise RequestError("no image requested")
        for r in requests:
            self.pipe.resolve(r)
        job = Job(list(requests), [None] * len(requests), on_done=on_done, flags=[None] * len(requests))
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            if len(self._queue) + sum(len(v) for v in self._parked.values()) + len(requests) > self.queue_size:
                raise QueueFull(self.retry_after(len(requests)))
            job._open = len(requests)
            self._jobs.add(job)
            self._queue.extend((job, i) for i in range(len(requests)))
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """Skip the job's images that are not on the devices yet."""
        with self._cond:
            job.cancelled = True
            self._cond.notify_all()

    def interrupt(self) -> int:
        """Stop every job at its next batch boundary (A1111's /interrupt); returns how many."""
        with self._cond:
            for job in self._jobs:
                job.interrupted = True
            self._cond.notify_all()
            return len(self._jobs)

    def progress(self) -> dict:
        with self._cond:
            jobs = list(self._jobs)
        total = sum(len(j.requests) for j in jobs)
        done = sum(j.finished_images for j in jobs)
        since = min((j.created for j in jobs), default=None)  # the oldest unfinished job (eta)
        return {"jobs": len(jobs), "images": total, "done": done, "queued": self.queued, "since": since}

    # ------------------------------------------------------------------ lifetime
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sd-jax-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def switch(self, pipe) -> None:
        """Serve ``pipe`` from the next batch on (the previous batch finishes on the old one)."""
        with self.lock:
            if self.monitor is not None:
                pipe.preview = self.monitor
            self.pipe = pipe

    # ------------------------------------------------------------------ worker thread
    def _finish(self, job: Job, n: int = 1) -> None:
        job._open -= n
        if job._open == 0:
            with self._cond:
                self._jobs.discard(job)
            job.done.set()
            if job.on_done is not None:
                try:
                    job.on_done(job)
                except Exception:  # a callback's failure (its client's event loop gone) is not the worker's
                    log.exception("a job's completion callback failed")

    def _wait(self) -> bool:
        """Wait for queued images or finished compilations; False once stopping with nothing left."""
        with self._cond:
            while not self._queue and not self._compiled_by_thread:
                if self._stopping and not self._parked:
                    return False
                self._cond.wait(0.5)
            return True

    def _take(self) -> list:
        """Gather queued images for up to max_wait (or until max_batch of them wait); take them."""
        with self._cond:
            if self._queue:
                deadline = time.monotonic() + self.max_wait
                while len(self._queue) < self.max_batch and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            taken = []
            while self._queue and len(taken) < self.max_batch:
                taken.append(self._queue.popleft())
            return taken

    def _merge_compiled(self) -> None:
        """Fold what compile threads produced into the pipeline; requeue their images."""
        with self._cond:
            done, self._compiled_by_thread = self._compiled_by_thread, []
        for key, (table, count, pipe_id), error in done:
            if error is None and pipe_id == id(self.pipe):  # not if the model was switched meanwhile
                self.pipe._compiled.update(table)
                self.pipe.compilations += count
            with self._cond:
                items = self._parked.pop(key, [])
                if error is None:
                    self._queue.extendleft(reversed(items))
            if error is not None:
                for job, _ in items:
                    job.error = job.error or error
                    self._finish(job)

    def _compile_later(self, plan, request: GenerationRequest, size: int, items: list) -> None:
        key = (plan, size)
        with self._cond:
            if key in self._parked:
                self._parked[key].extend(items)
                return
            self._parked[key] = list(items)
        shadow = copy.copy(self.pipe)
        shadow._compiled = {}
        shadow.compilations = 0
        pipe_id = id(self.pipe)

        def work():
            error = None
            try:
                shadow.compile(plan, request, size)
            except Exception as e:  # delivered to the jobs waiting for this plan
                error = e
            with self._cond:
                self._compiled_by_thread.append((key, (shadow._compiled, shadow.compilations, pipe_id), error))
                self._cond.notify_all()

        threading.Thread(target=work, name="sd-jax-compile", daemon=True).start()

    def _loop(self) -> None:
        while True:
            if not self._wait():
                return
            with self.lock:  # taken before the images: a model switch or a test holding it stops both
                self._merge_compiled()
                live = []
                for job, i in self._take():
                    if job.cancelled or job.interrupted or job.error is not None:
                        self._finish(job)
                    else:
                        live.append((job, i))
                if live:
                    t0 = time.perf_counter()
                    self._run(live)
                    self.busy_seconds += time.perf_counter() - t0
                if self.monitor is not None:
                    self.monitor.reset()

    def _run(self, live: list) -> None:
        """The images of ``live``, one group per LoRA set (a prompt's ``<lora:...>`` tags), each
        group in as few calls as its plans allow; switching sets re-merges the parameters (no
        recompilation: they are an argument of the compiled calls)."""
        groups: dict = {}
        for job, i in live:
            r = job.requests[i]
            groups.setdefault(tuple(lora_prompts.prompt_loras(r.prompt, r.prompt_syntax)), []).append((job, i))
        for tags, items in groups.items():
            try:
                self._use_loras(tags)
            except Exception as e:  # a LoRA that does not fit the model fails its requests alone
                for job, _ in items:
                    job.error = job.error or e
                    self._finish(job)
                continue
            self._run_group(items)

    def _use_loras(self, tags: tuple) -> None:
        """Merge the pipeline's own LoRAs plus ``tags`` (as the Python API's ``pipe(prompt)``
        does for a tagged prompt), unless they are merged already."""
        pipe = self.pipe
        base, current, params = self._loras.get(id(pipe), (None, (), None))
        if base is None or pipe.params is not params:  # a new model, or its parameters changed meanwhile:
            if not tags:  # it holds its own LoRAs (if any): nothing to merge
                return
            base, current = [(lora.path, w) for lora, _, w in pipe.loras.loras.values()], ()
        if tags != current:
            pipe.use_loras(base + lora_prompts.resolve_tags(list(tags), self.lora_dir, "--lora-dir"))
        self._loras = {id(pipe): (base, tags, pipe.params)}

    def _run_group(self, live: list) -> None:
        pipe = self.pipe
        buckets = bucket_sizes(pipe.mesh.devices.size, self.max_batch)
        try:
            planned = Dispatcher(pipe).plan([job.requests[i] for job, i in live])
        except Exception as e:  # the model changed under a queued request: it fails alone
            for job, _ in live:
                job.error = job.error or e
                self._finish(job)
            return
        for plan, group in planned:
            items = [live[k] for k, _ in group]
            compiled = pipe.compiled_sizes(plan) & set(buckets)
            if any(c >= len(items) for c in compiled):
                limit = self.max_batch  # the dispatcher picks the compiled size
            else:  # compile the right size meanwhile; until then, run in calls of a compiled size if any
                want = next(b for b in buckets if b >= len(items))
                self._compile_later(plan, group[0][1], want, [] if compiled else items)
                if not compiled:
                    continue
                limit = max(compiled)
            dispatcher = Dispatcher(pipe, batch_size=limit)
            try:
                for chunk in dispatcher.run([r for _, r in group]):
                    images, flags = chunk.host(), chunk.host_flags()
                    self.metrics.observe_call(len(chunk.items), chunk.size)
                    for j, ((k, _), img) in enumerate(zip(chunk.items, images)):
                        job, i = items[k]
                        job.results[i] = img
                        job.flags[i] = None if flags is None else bool(flags[j])
                        self._finish(job)
            except Exception as e:  # a failed call fails its jobs, not the server
                for job, i in items:
                    if job.results[i] is None:
                        job.error = job.error or e
                        self._finish(job)
