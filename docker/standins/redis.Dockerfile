# Stand-in for redis:7.4-alpine, from Debian bookworm's packages: redis-server and redis-cli on PATH,
# /data as the working directory and volume, and the official entrypoint's behaviour: started as root
# with `redis-server ...`, it gives /data to the redis user and runs Redis as that user. Built by build.sh.
FROM urae-standin/debian:bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
