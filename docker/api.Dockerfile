# The API: FastAPI and a Redis client only. No torch and no model, so it is small and starts at once.
# Build from the repository root: docker build -f docker/api.Dockerfile .
# Every version comes from requirements.lock (the versions CI tests).

# The base: the public image by default; CI builds on a local stand-in (docker/standins/build.sh).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS install
# 1: install from docker/wheelhouse alone (docker/prepare-wheelhouse.sh fills it), never from an index.
ARG PIP_NO_INDEX=0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock docker/requirements-api.txt /tmp/
# Wheels found here are used first; it is empty unless prepared (and never reaches the final image).
COPY docker/wheelhouse /tmp/wheelhouse
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --find-links /tmp/wheelhouse -c /tmp/requirements.lock -r /tmp/requirements-api.txt
# Only the HTTP edge, the shared job store and webhook delivery: the library and the worker (and their
# torch) stay out.
COPY pyproject.toml README.md /src/
COPY jobstore /src/jobstore
COPY service /src/service
# The webhook delivery worker runs from this image too (`python -m webhooks`).
COPY webhooks /src/webhooks
RUN /opt/venv/bin/pip install --find-links /tmp/wheelhouse -c /tmp/requirements.lock --no-deps /src

FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    URAE_API_HOST=0.0.0.0 \
    URAE_API_PORT=8000 \
    URAE_STORAGE_DIR=/data

RUN useradd --create-home --uid 1000 urae \
    && mkdir -p /data \
    && chown urae:urae /data
COPY --from=install /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/urae/healthcheck.py

USER 1000:1000
WORKDIR /home/urae
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/urae/healthcheck.py", "api"]
CMD ["urae-api"]
