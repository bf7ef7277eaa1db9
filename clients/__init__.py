"""Clients for KServe v2 gRPC servers."""

from rapidserve.clients.client import AsyncClient, Client, InferenceServerError, ModelMetadata

__all__ = ["AsyncClient", "Client", "InferenceServerError", "ModelMetadata"]
