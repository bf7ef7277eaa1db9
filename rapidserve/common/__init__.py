"""What the clients and the server both use: the v2 datatypes, tensor specs and the tensor codec.

It imports neither side (``rapidserve.server``, ``rapidserve.clients``) nor the engines, so a client
installs and imports without the serving core, and the engines describe themselves without it.
"""
