"""``--frontends N``: the gRPC and HTTP edge in N processes, the models in one engine process.

``engine`` is the engine process's side (it starts, watches and drains the front ends), ``process`` a
front end's main, ``remote`` what a front end sees of the engine, ``channel`` and ``shm`` how they talk:
control messages over a socket pair, tensors through shared memory.
"""
