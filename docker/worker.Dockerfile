# Generation and fine-tune workers: PyTorch, the library with its train and gpu extras (prodigyopt,
# torchao), the RQ worker. One container per GPU.
# Build from the repository root: docker build -f docker/worker.Dockerfile .
# Every version comes from requirements.lock (the versions CI tests), torch included: by default PyPI's
# Linux wheel, which is the CUDA build (CUDA 13; its CUDA libraries come as the lock's nvidia-* wheels).

# The base: the public image by default; CI builds on a local stand-in (docker/standins/build.sh).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS install
# Where torch's wheel comes from besides PyPI: https://download.pytorch.org/whl/cpu for the CPU build
# (docker-compose.cpu.yml); empty: PyPI's CUDA build. Either way at the lock's version.
ARG TORCH_INDEX_URL=
# 1: install from docker/wheelhouse alone (docker/prepare-wheelhouse.sh fills it), never from an index.
ARG PIP_NO_INDEX=0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock /tmp/
# Wheels found here are used first; it is empty unless prepared (and never reaches the final image).
COPY docker/wheelhouse /tmp/wheelhouse
# torch first, alone: its index (CPU or CUDA build) must not decide any other package's version.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --find-links /tmp/wheelhouse -c /tmp/requirements.lock \
       ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
       "torch==$(sed -n 's/^torch==//p' /tmp/requirements.lock)"
COPY pyproject.toml README.md /src/
COPY urae /src/urae
COPY jobstore /src/jobstore
COPY service /src/service
COPY worker /src/worker
# train: Prodigy, the optimizer of the URAE recipes; gpu: torchao, fp8 for the fast tier.
RUN /opt/venv/bin/pip install --find-links /tmp/wheelhouse -c /tmp/requirements.lock "/src[train,gpu]"

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torch/inductor \
    TRITON_CACHE_DIR=/cache/torch/triton \
    TORCHINDUCTOR_FX_GRAPH_CACHE=1 \
    TORCHINDUCTOR_AUTOGRAD_CACHE=1 \
    URAE_STORAGE_DIR=/data \
    URAE_DEVICE=cuda \
    URAE_DTYPE=bfloat16

# A C compiler: Triton (torch.compile on CUDA, on by default) compiles its launchers at run time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 urae \
    && mkdir -p /data /cache/huggingface /cache/torch \
    && chown -R urae:urae /data /cache
COPY --from=install /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/urae/healthcheck.py

USER 1000:1000
WORKDIR /home/urae
# Model weights (tens of GB) are downloaded once into this volume, not into the image.
VOLUME ["/cache/huggingface"]
# Compiled kernels of the transformer blocks: a restarted worker reuses them instead of compiling again.
VOLUME ["/cache/torch"]
# Loading FLUX.1-dev the first time means downloading it: a long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30m --retries=3 \
    CMD ["python", "/opt/urae/healthcheck.py", "worker"]
ENTRYPOINT ["urae-worker"]
CMD ["--queues", "generate"]
