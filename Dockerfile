# syntax=docker/dockerfile:1
# image: ghcr.io/posdistill/posdistill:0.1.0
# The one image every cluster manifest runs (cluster/kuberay/*.yaml); the tag's version is
# pyproject.toml's. Entrypoint-free: KubeRay (or `docker run IMAGE ray start ...`) gives the command.
#
#   CPU:  docker build -t ghcr.io/posdistill/posdistill:0.1.0-cpu \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   CUDA: docker build -t ghcr.io/posdistill/posdistill:0.1.0 .
#         (PyPI's Linux torch wheel bundles its CUDA runtime; the node supplies only the driver.
#          A CUDA base image works too: --build-arg BASE=<an image with Python >= 3.10 and pip>.)
ARG BASE=python:3.11-slim
FROM ${BASE}

# Pinned torch goes in first, from TORCH_INDEX_URL: an unpinned torch pulled in by a dependency
# would be whatever build pip picks.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1

# g++: DeepSpeed compiles its CPU ops just in time; wget: KubeRay's exec health probes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ wget \
    && rm -rf /var/lib/apt/lists/*

RUN python -m pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# Only what `pip install .` needs (the .dockerignore keeps the rest of the context out too).
WORKDIR /opt/posdistill
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY stages/ stages/
COPY cluster/ cluster/
COPY configs/ configs/
# EXTRAS: the optional trackers (train.report_to); build with --build-arg EXTRAS= for none.
ARG EXTRAS=wandb,mlflow
RUN python -m pip install ".[${EXTRAS}]" && python -c "import pipeline.cli, stages, cluster"

# Ray and DeepSpeed write under $HOME (~/.ray, ~/.cache/torch_extensions): a non-root user with a home.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
USER ray
WORKDIR /home/ray
