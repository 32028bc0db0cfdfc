# Generation and fine-tune workers: CUDA PyTorch, the library, the RQ worker. One container per GPU.
# Build from the repository root: docker build -f docker/worker.Dockerfile .
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torch/inductor \
    TRITON_CACHE_DIR=/cache/torch/triton \
    TORCHINDUCTOR_FX_GRAPH_CACHE=1 \
    TORCHINDUCTOR_AUTOGRAD_CACHE=1 \
    URAE_STORAGE_DIR=/data \
    URAE_DEVICE=cuda \
    URAE_DTYPE=bfloat16

RUN useradd --create-home --uid 1000 urae \
    && mkdir -p /data /cache/huggingface /cache/torch \
    && chown -R urae:urae /data /cache

# The base image's CUDA torch satisfies the project's torch range, so pip keeps it.
COPY pyproject.toml README.md /src/
COPY urae /src/urae
COPY jobstore /src/jobstore
COPY service /src/service
COPY worker /src/worker
RUN pip install /src && rm -rf /src
# fp8 for the fast tier: the torchao release built for the base image's torch (2.7), without
# dependencies so that pip keeps that torch.
RUN pip install --no-deps "torchao==0.11.0"
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
