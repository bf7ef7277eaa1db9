# rapidserve container image.
#
#   CPU (default):  docker build -t rapidserve .
#   GPU:            docker build --build-arg VARIANT=gpu -t rapidserve:gpu .
#
# VARIANT selects the pip extra from pyproject.toml: "cpu" (onnxruntime) or "gpu" (onnxruntime-gpu,
# nvidia-ml-py). Running the GPU image needs the NVIDIA Container Toolkit on the host
# (`docker run --gpus all ...`). The toolkit mounts only the driver: onnxruntime-gpu from PyPI does not
# bundle the CUDA 12 / cuDNN 9 user-space libraries, and without them ONNX Runtime falls back to the CPU.
#
# Without a model repository the server builds and serves the demo model "digits" (into
# ~/.cache/rapidserve, hence the home directory). Mount your own with
#   docker run -v /path/to/models:/models:ro -e RAPIDSERVE_MODEL_REPOSITORY=/models ...
#
# The server's defaults are the hardened ones (docs/security.md): no model uploads, config paths confined
# to each model's folder, 64 MiB messages, 1 GiB of requests in flight, handshake and read timeouts. TLS
# and access keys come from mounted files, never from the image:
#   -e RAPIDSERVE_GRPC_USE_SSL=true -e RAPIDSERVE_GRPC_SERVER_CERT=/run/secrets/server.pem ...
#   -e RAPIDSERVE_GRPC_RESTRICTED_PROTOCOL="model-repository,statistics:admin-key=@/run/secrets/admin-key"
# With TLS, the health check below needs the CA too: -e RAPIDSERVE_ROOT_CERTIFICATES=/run/secrets/ca.pem
# (plus RAPIDSERVE_PRIVATE_KEY / RAPIDSERVE_CERTIFICATE_CHAIN under mutual TLS, RAPIDSERVE_SSL_TARGET_NAME
# when the certificate does not name localhost, RAPIDSERVE_HEADER when `health` is a restricted protocol).
# Run it read-only with no capabilities: --read-only --tmpfs /tmp --tmpfs /home/rapidserve/.cache:uid=1000
#   --cap-drop ALL --security-opt no-new-privileges

FROM python:3.11-slim

ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what `pip install` needs (pyproject.toml names README.md as the package's readme).
WORKDIR /opt/rapidserve
COPY pyproject.toml README.md ./
COPY rapidserve/ rapidserve/
COPY server/ server/
COPY engines/ engines/
COPY clients/ clients/
COPY protos/ protos/

# "./[extra]" rather than ".[extra]": the same install, but hadolint's DL3013 (pin pip versions) sees a
# local path, not a package from an index. A non-root user with a home for the demo model's cache.
RUN pip install --no-cache-dir "./[${VARIANT}]" \
    && useradd --create-home --no-log-init --uid 1000 --user-group --shell /usr/sbin/nologin rapidserve
# Numeric, so that runtimes enforcing runAsNonRoot can verify it without reading /etc/passwd.
USER 1000:1000
WORKDIR /home/rapidserve

# 8000: HTTP/REST and 8001: gRPC (both the KServe v2 / Triton protocol), 8002: Prometheus /metrics
EXPOSE 8000 8001 8002

# The first start builds the demo model, so give it a minute before failed checks count.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["rapidserve", "health", "--url", "localhost:8001"]

# SIGTERM drains: in-flight requests finish (up to --exit-timeout-secs, 30), then the server exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rapidserve"]
CMD ["serve"]
