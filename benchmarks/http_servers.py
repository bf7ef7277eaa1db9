"""The HTTP server library for the REST front end, chosen by measurement: the same minimal KServe v2
endpoints served by aiohttp.web, aiohttp's low-level web.Server and uvicorn (httptools, bare ASGI app).

Each server runs alone in a subprocess on core 0 with uvloop; one raw-socket HTTP/1.1 driver (keep-alive
connections, uvloop) on core 1 loads them in turn, alternating the servers within each round.

    python benchmarks/http_servers.py [--seconds 3] [--rounds 2] [--concurrency 1,16,64]
    python benchmarks/http_servers.py --serve aiohttp-web|aiohttp-lowlevel|uvicorn   (one server alone)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import numpy as np
import uvloop
from _harness import Server, print_table

KINDS = ("aiohttp-web", "aiohttp-lowlevel", "uvicorn")
INFER_PATH = "/v2/models/mlp/infer"
READY_PATH = "/v2/health/ready"


def infer_body() -> bytes:
    """A v2 JSON infer request of 64 FP32 values (~300 bytes once rounded like a client would send them)."""
    values = [round(float(v), 1) for v in np.random.default_rng(0).standard_normal(64)]
    body = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": values}]}
    return json.dumps(body, separators=(",", ":")).encode()


def answer(body: bytes) -> bytes:
    """Parse the request as the REST API would and answer ~100 bytes of JSON."""
    request = json.loads(body)
    total = sum(request["inputs"][0]["data"])
    reply = {"model_name": "mlp", "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [total]}]}
    return json.dumps(reply, separators=(",", ":")).encode()


# --- the three servers -------------------------------------------------------------------------------


async def serve_aiohttp_web(port: int) -> Callable[[], Awaitable[None]]:
    from aiohttp import web

    async def infer(request: web.Request) -> web.Response:
        return web.Response(body=answer(await request.read()), content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(body=b"")

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_get(READY_PATH, ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    announce(runner.addresses[0][1])
    return runner.cleanup


async def serve_aiohttp_lowlevel(port: int) -> Callable[[], Awaitable[None]]:
    from aiohttp import web

    async def handler(request: web.BaseRequest) -> web.Response:
        if request.method == "POST" and request.path == INFER_PATH:
            return web.Response(body=answer(await request.read()), content_type="application/json")
        if request.method == "GET" and request.path == READY_PATH:
            return web.Response(body=b"")
        return web.Response(status=404)

    server = web.Server(handler, access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", port)
    announce(listener.sockets[0].getsockname()[1])

    async def stop() -> None:
        listener.close()
        await server.shutdown(5)

    return stop


async def serve_uvicorn(port: int) -> Callable[[], Awaitable[None]]:
    """uvicorn on the running loop: serve() with signal capture turned off, so it leaves the signals alone."""
    import socket

    import uvicorn

    json_headers = [(b"content-type", b"application/json")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "POST" and scope["path"] == INFER_PATH:
            status, headers, payload = 200, json_headers, answer(body)
        elif scope["method"] == "GET" and scope["path"] == READY_PATH:
            status, headers, payload = 200, [], b""
        else:
            status, headers, payload = 404, [], b""
        headers = [*headers, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    class InProcessServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the embedding process owns the signals

    config = uvicorn.Config(app, http="httptools", lifespan="off", access_log=False, log_level="warning")
    server = InProcessServer(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    announce(sock.getsockname()[1])

    async def stop() -> None:
        server.should_exit = True
        await task

    return stop


SERVERS = {"aiohttp-web": serve_aiohttp_web, "aiohttp-lowlevel": serve_aiohttp_lowlevel, "uvicorn": serve_uvicorn}


def announce(port: int) -> None:
    print(f"listening on 127.0.0.1:{port}\nserver ready", flush=True)


async def serve_forever(kind: str, port: int) -> None:
    stop = await SERVERS[kind](port)
    try:
        await asyncio.Event().wait()
    finally:
        await stop()


# --- the load generator ------------------------------------------------------------------------------


def request_bytes(method: str, path: str, body: bytes) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def connection(port: int, message: bytes, stop_at: float, latencies: list[float]) -> None:
    """One keep-alive connection sending requests back to back until stop_at."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter
    while (start := clock()) < stop_at:
        writer.write(message)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:40]!r}")
        if length:
            await reader.readexactly(length)
        latencies.append(clock() - start)
    writer.close()


async def load(port: int, message: bytes, concurrency: int, seconds: float) -> list[float]:
    await asyncio.gather(*(connection(port, message, time.perf_counter() + 0.5, []) for _ in range(concurrency)))
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(connection(port, message, stop_at, latencies) for _ in range(concurrency)))
    return latencies


def measure(server: Server, message: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    cpu0, wall0, own0 = server.cpu_seconds(), time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    latencies = asyncio.run(load(server.port, message, concurrency, seconds))
    own1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - wall0
    count = len(latencies)
    return {
        "rps": count / seconds,
        "p50": float(np.percentile(latencies, 50) * 1000),
        "p99": float(np.percentile(latencies, 99) * 1000),
        "cpu_us": (server.cpu_seconds() - cpu0) / count * 1e6,
        "client_cpu": (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=KINDS, help="run one server in this process (used by the driver)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="1,16,64")
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve_forever(args.serve, args.port))
        return

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    os.sched_setaffinity(0, {1})
    points = [("infer", request_bytes("POST", INFER_PATH, infer_body()), int(c)) for c in args.concurrency.split(",")]
    points.append(("ready", request_bytes("GET", READY_PATH, b""), 16))
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        order = KINDS if round_ % 2 == 0 else KINDS[::-1]
        for kind in order:
            server = Server([sys.executable, __file__, "--serve", kind], core=0, ready_line="server ready")
            try:
                for name, message, concurrency in points:
                    results.setdefault((kind, name, concurrency), []).append(
                        measure(server, message, concurrency, args.seconds)
                    )
            finally:
                server.stop()

    rows = []
    for name, _, concurrency in points:
        base = np.mean([r["rps"] for r in results[("aiohttp-web", name, concurrency)]])
        base_cpu = np.mean([r["cpu_us"] for r in results[("aiohttp-web", name, concurrency)]])
        for kind in KINDS:
            runs = results[(kind, name, concurrency)]
            mean = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
            spread = max(r["rps"] for r in runs) / min(r["rps"] for r in runs) - 1
            rows.append(
                [name, concurrency, kind, mean["rps"], mean["p50"], mean["p99"], mean["cpu_us"],
                 f"{mean['rps'] / base:.2f}", f"{mean['cpu_us'] / base_cpu:.2f}", f"{spread:.0%}",
                 f"{mean['client_cpu']:.2f}"]
            )  # fmt: skip
    print_table(
        f"means of {args.rounds} rounds of {args.seconds:g} s, server on core 0, driver on core 1",
        ["endpoint", "conc", "server", "req/s", "p50 ms", "p99 ms", "cpu us/req", "x rps", "x cpu", "spread",
         "driver cpu"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
