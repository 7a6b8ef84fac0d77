"""``sd-jax serve`` under load: 1, 8 and 32 concurrent clients against the same requests sent
one at a time, images/s and p50/p95 latency; the batching factor is images/s with N clients over
images/s sequentially.

    python benchmarks/bench_server.py                                  # shipped model, CPU, 64x64, 2 steps
    python benchmarks/bench_server.py --requests 64 --clients 1 8 32
    python benchmarks/bench_server.py --model PATH --size 512 --steps 20 --dtype bf16 --max-batch 32   # GPU
    python benchmarks/bench_server.py --url http://host:7860           # a server already running

It starts ``sd-jax serve`` (``--precompile``: every call size compiled and run once, so no
compilation is timed), makes one untimed pass of everything below, then for each client count sends ``--requests`` txt2img requests over the A1111 API from that
many threads (each request one image, its own prompt and seed) and measures from the first
send to the last answer.  ``sequential`` sends the same requests one after another.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "checkpoints", "sd-jax-shapes"))
    ap.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--requests", type=int, default=32, help="requests per measurement")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--dtype", default="fp32")
    return ap.parse_args()


def start_server(a) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sd_jax.cli", "serve", "--model", a.model, "--port", str(port), "--dtype", a.dtype,
           "--precompile", f"{a.size}x{a.size}:{a.steps}", "--max-batch", str(a.max_batch),
           "--max-wait-ms", str(a.max_wait_ms), "--queue-size", str(max(64, a.requests))]
    proc = subprocess.Popen(cmd, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc, timeout: float = 1800) -> None:
    import httpx
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise SystemExit("the server ended before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def run(url: str, a, clients: int, offset: int) -> dict:
    """``a.requests`` requests from ``clients`` threads (0: one after another in this thread)."""
    import httpx
    latencies: list = []
    errors: list = []
    lock = threading.Lock()
    todo = list(range(a.requests))

    def client():
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                body = {"prompt": f"a red circle number {i}", "seed": offset + i, "steps": a.steps,
                        "width": a.size, "height": a.size, "cfg_scale": 7.0}
                t0 = time.perf_counter()
                r = http.post(url + "/sdapi/v1/txt2img", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else errors).append(dt if r.status_code == 200 else r.text)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(max(clients, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} request(s) failed: {errors[0]}")
    q = statistics.quantiles(latencies, n=20)
    return {"images_per_s": a.requests / wall, "p50": statistics.median(latencies), "p95": q[18], "wall": wall}


def main():
    a = parse()
    proc = None
    url = a.url
    if url is None:
        proc, url = start_server(a)
    try:
        wait_ready(url, proc)
        for warm in (True, False):  # a first pass runs every call size once (first runs are slower)
            rows = [("sequential", run(url, a, 0, 10_000 * warm))]
            for c in a.clients:
                rows.append((f"{c} clients", run(url, a, c, 10_000 * warm)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    base = rows[0][1]["images_per_s"]
    print(f"\n{a.requests} requests of 1 image, {a.size}x{a.size}, {a.steps} steps, max batch {a.max_batch}, "
          f"max wait {a.max_wait_ms:g} ms")
    print("| clients | images/s | p50 latency (s) | p95 latency (s) | vs sequential |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['images_per_s']:.2f} | {r['p50']:.3f} | {r['p95']:.3f} | "
              f"{r['images_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
