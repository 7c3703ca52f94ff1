# syntax=docker/dockerfile:1
# The xfer image: Ray head and workers, the RayJob submitter, and the MLflow tracking server.
#
#   docker build -t REGISTRY/xfer:0.1.0 .          (versions below are build args; override with --build-arg)
#
# Base: Ray's own CUDA image, so the Ray inside is exactly the rayVersion the manifests declare
# (KubeRay requires them to match; tests/test_k8s.py checks RAY_VERSION against xfer/templates/),
# with Python 3.11, the CUDA runtime, the non-root `ray` user (uid 1000, gid 100) and the tools
# KubeRay's probes use (wget). PyTorch comes from its CUDA wheel index on top.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu128
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}

ARG RAY_VERSION
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

# numeric user: Kubernetes can only verify runAsNonRoot against a numeric USER
USER 1000:100
WORKDIR /home/ray/xfer

# The big, rarely-changing layer first: CUDA PyTorch.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# Then xfer and its dependencies from pyproject.toml. The [server] extra adds what the MLflow
# tracking server needs (psycopg2 for Postgres, Flask-WTF for the basic-auth app). Ray stays at
# the base image's version.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 xfer ./xfer
# DL3013: xfer's own dependencies are version ranges on purpose (pyproject.toml); what must match
# the cluster - Ray and torch - is pinned by the build args.
# hadolint ignore=DL3013
RUN pip install ".[server]" "ray[tune,default]==${RAY_VERSION}" \
    && python -c "import xfer, torch, ray, mlflow, psycopg2, flask_wtf; assert ray.__version__ == '${RAY_VERSION}', ray.__version__"

# Sweep files: a RayJob's entrypoint (`xfer sweep sweeps/<name>.yaml`) runs in this directory.
COPY --chown=1000:100 sweeps ./sweeps

# No credentials live in the image: MLflow and Postgres passwords and the Ray token arrive at run
# time as environment variables from Kubernetes Secrets (k8s/base/secret.example.yaml).
CMD ["xfer", "--help"]
