# The API: FastAPI and a Redis client only. No torch and no model, so it is small and starts at once.
# Build from the repository root: docker build -f docker/api.Dockerfile .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    URAE_API_HOST=0.0.0.0 \
    URAE_API_PORT=8000 \
    URAE_STORAGE_DIR=/data

RUN useradd --create-home --uid 1000 urae \
    && mkdir -p /data \
    && chown urae:urae /data

COPY docker/requirements-api.txt /tmp/requirements-api.txt
RUN pip install -r /tmp/requirements-api.txt

# Only the HTTP edge, the shared job store and webhook delivery: the library and the worker (and their
# torch) stay out.
COPY pyproject.toml README.md /src/
COPY jobstore /src/jobstore
COPY service /src/service
# The webhook delivery worker runs from this image too (`python -m webhooks`).
COPY webhooks /src/webhooks
RUN pip install --no-deps /src && rm -rf /src
COPY docker/healthcheck.py /opt/urae/healthcheck.py

USER 1000:1000
WORKDIR /home/urae
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/urae/healthcheck.py", "api"]
CMD ["urae-api"]
