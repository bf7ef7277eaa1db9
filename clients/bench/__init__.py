"""``rapidserve bench``: load-test a KServe v2 server (rapidserve, Triton, anything that speaks it) over gRPC,
or with ``--protocol http`` over its HTTP/REST endpoint (``http_transport``: HTTP/1.1 keep-alive, binary
tensor data, a lean client of the package's own).

Requests are serialized once (``payloads``) and sent as raw bytes (``transports``) over the package's
own lean HTTP/2 gRPC client, which costs a fraction of grpcio's CPU per call; answers are not decoded,
only their status (a stream's answers are parsed for their id and error). Closed loop over a
concurrency sweep, or open loop at fixed request rates, measured by ``rapidserve.clients.loadgen`` in
one process or several (``jobs``); the server's own breakdown (queue, compute, batch size, cache hits)
comes from the statistics RPC, read before and after each load point (``server_stats``); ``report``
prints, writes and plots the results. TLS (mutual too) and headers apply to every connection, the
bench's own and the ``Client`` that reads metadata and statistics.
"""

from rapidserve.clients.bench.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
