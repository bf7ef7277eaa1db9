"""A front-end process: the gRPC and HTTP edge of the server, over the engine process's models.

Started by the engine process as ``python -m rapidserve.server.frontend.process SOCKET REQUESTS ANSWERS
INDEX`` (inherited file descriptors: its end of the socket pair, and the two shared-memory regions). It
serves on the ports the engine holds (SO_REUSEPORT), decodes, validates and encodes, and sends every
inference to the engine. It drains and exits when the engine says so, and exits at once (status 1) if
the engine is gone: an orchestrator then sees the server down, not half of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

from rapidserve.server.app import InferenceServer
from rapidserve.server.frontend.channel import Channel, ChannelClosed
from rapidserve.server.frontend.remote import EngineLink, RemoteManager
from rapidserve.server.frontend.shm import Arena
from rapidserve.server.stats import ServerStats

__all__ = ["main"]

log = logging.getLogger("rapidserve.frontend")


async def _run(sock_fd: int, requests_fd: int, answers_fd: int, index: int) -> int:
    channel = await Channel.open(socket.socket(fileno=sock_fd))
    (kind, settings, shm_bytes, level), *early = await channel.receive()
    assert kind == "setup"
    logging.getLogger().setLevel(level)
    link = EngineLink(channel, Arena(requests_fd, shm_bytes), Arena(answers_fd, shm_bytes), ServerStats())
    manager = RemoteManager(link)
    server = InferenceServer(settings, manager)
    link.stats = server.stats
    drain = asyncio.Event()
    link.handlers["drain"] = drain.set
    link.answers["reload_certificates"] = server.reload_certificates
    link.answers["sync"] = lambda: True  # (answered after every table sent before the question)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, drain.set)  # (SIGINT goes to the engine, which drains us)
    reader = asyncio.create_task(link.run(early))
    try:
        await server.start()
    except Exception as exc:
        log.error("front end %d cannot start: %s", index, exc)
        return 1
    channel.send(("serving", os.getpid()))
    drained = asyncio.create_task(drain.wait())
    done, _ = await asyncio.wait((reader, drained), return_when=asyncio.FIRST_COMPLETED)
    if reader in done:  # the engine is gone: no model is left to serve
        with contextlib.suppress(ChannelClosed):
            reader.result()
        log.error("front end %d: the engine process is gone; exiting", index)
        return 1
    await server.stop()
    channel.send(("stopped",))
    await channel.drain()
    reader.cancel()
    return 0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock_fd, requests_fd, answers_fd, index = (int(a) for a in argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(sock_fd, requests_fd, answers_fd, index))
    return int(uvloop.run(_run(sock_fd, requests_fd, answers_fd, index)))


if __name__ == "__main__":
    code = main(sys.argv[1:])
    logging.shutdown()
    os._exit(code)  # (gRPC's threads must not hold the exit)
