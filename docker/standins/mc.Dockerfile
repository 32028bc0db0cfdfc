# Stand-in for minio/mc: an `mc` with the commands the compose files use (alias set, mb, ready), in
# Python's standard library (AWS Signature V4). Built by build.sh.
FROM urae-standin/debian:bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY mc.py /usr/bin/mc
ENTRYPOINT ["mc"]
