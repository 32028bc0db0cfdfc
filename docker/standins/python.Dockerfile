# Stand-in for python:3.11-slim, from Debian bookworm's packages: CPython 3.11 whose `python`, `python3`
# and `pip` are in /usr/local/bin (a virtual environment at /usr/local, so pip installs without Debian's
# externally-managed guard, as in the real image), its headers, CA certificates. Built by build.sh.
FROM urae-standin/debian:bookworm
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv libpython3.11-dev ca-certificates netbase \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /usr/local \
    && /usr/local/bin/python -m pip --version
ENV LANG=C.UTF-8
CMD ["python3"]
