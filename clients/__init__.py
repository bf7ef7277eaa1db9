"""Clients for KServe v2 servers, over gRPC or (``http://`` / ``https://`` URLs) HTTP/REST."""

from rapidserve.clients.client import AsyncClient, Client, InferenceServerError, ModelMetadata

__all__ = ["AsyncClient", "Client", "InferenceServerError", "ModelMetadata"]
