# syntax=docker/dockerfile:1
# zerostart's container image: a slim CUDA base with no build tools, a virtual environment
# built in a separate stage.
#
#   docker build -t zerostart:0.1.0 .                                  # the single-node server
#   docker build -t zerostart:0.1.0-ray --build-arg EXTRAS=ray .       # + Ray Serve, for KubeRay
#
# Size, estimated from its layers (no Docker engine ran it; docs/cluster.md#the-image and
# bench/results/2026-12-01-image-size-estimate.json): ~6.6 GB unpacked, ~2.7 GB to pull; +0.3 GB
# with Ray. 4.8 GB of it are the CUDA libraries the torch wheels carry; the
# base is CUDA's `base` flavour (driver compatibility and cudart only) because those wheels bring
# their own cuBLAS/cuDNN/NCCL: a `runtime` or `devel` base would hold a second copy.

ARG CUDA_BASE=nvidia/cuda:13.0.1-base-ubuntu24.04

# -- build: the venv, with pip and a compiler-free toolchain --------------------------------
FROM ${CUDA_BASE} AS build
ARG EXTRAS=""
ARG TORCH=torch==2.13.0
ARG RAY="ray[serve]==2.60.0"
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/zerostart
ENV PATH=/opt/zerostart/bin:$PATH
# dependencies first: this layer is reused while only zerostart's code changes
COPY pyproject.toml README.md /src/
RUN mkdir -p /src/zerostart && touch /src/zerostart/__init__.py \
 && pip install "${TORCH}" \
 && pip install /src \
 && if [ "${EXTRAS}" = "ray" ]; then pip install "${RAY}"; fi \
 && pip uninstall -y zerostart
COPY zerostart /src/zerostart
RUN pip install --no-deps /src \
    # what a server never runs: torch.compile's Triton and C++ headers (zerostart uses CUDA graphs;
    # compile stays off in this image), test suites, and pip itself
 && pip uninstall -y triton pip setuptools \
 && rm -rf /opt/zerostart/lib/python3.12/site-packages/torch/include \
           /opt/zerostart/lib/python3.12/site-packages/torch/share/cmake \
           /opt/zerostart/lib/python3.12/site-packages/torch/test \
 && find /opt/zerostart -depth -type d -name tests -path "*site-packages/*/tests" -exec rm -rf {} + \
 && python3.12 -m compileall -q -j 0 /opt/zerostart/lib/python3.12/site-packages/zerostart

# -- runtime: CUDA base + the Python interpreter + the venv ----------------------------------
FROM ${CUDA_BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 zerostart \
 && mkdir -p /var/cache/zerostart && chown zerostart /var/cache/zerostart
COPY --from=build /opt/zerostart /opt/zerostart
ENV PATH=/opt/zerostart/bin:$PATH \
    ZEROSTART_CACHE_DIR=/var/cache/zerostart \
    PYTHONUNBUFFERED=1
USER zerostart
EXPOSE 8000
ENTRYPOINT ["zerostart"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
