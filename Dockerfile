# syntax=docker/dockerfile:1
# The worker's image. Two stages on the same base: `build` makes a virtualenv from the hashed
# lock (requirements.lock, `scripts/lock`) plus this package, `runtime` gets only that
# virtualenv — no pip, no compilers, no caches. It runs as an unnamed numeric user and writes
# nothing at run time, so a read-only root filesystem works (Kubernetes mounts /tmp).
#
#   docker build -t vercel-event-consumer .
#   docker build --build-arg BASE_IMAGE=registry.example/python:3.11-slim -t … .

# A pinned official Python slim image; any Debian-like base with python3 and its venv module
# works (the tests build on a Debian bookworm made locally).
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
# Behind a mirror or a TLS-inspecting proxy: --build-arg PIP_INDEX_URL=… and PIP_CERT=<path of
# a CA bundle mounted into the build>. Build arguments stay in this stage, not in the image.
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Dependencies first, from the lock with hashes: this layer is reused until the lock changes.
COPY requirements.lock ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-deps --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY consumer ./consumer
# The package itself, built offline with the locked setuptools; then pip and setuptools leave
# the virtualenv (`pip check` first: the lock must hold every dependency).
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation --no-index . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="vercel-event-consumer" \
      org.opencontainers.image.description="Relays RabbitMQ domain events to Vercel Marketplace's Create Event API"
# Bytecode was compiled at install time; nothing is written beside it at run time.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
COPY --from=build /opt/venv /opt/venv
# No account is needed: the files are root's and read-only to this user.
USER 10001:10001
# /livez, /readyz and /metrics (CONSUMER_HEALTH_PORT)
EXPOSE 8080
ENTRYPOINT ["vercel-consumer"]
CMD ["run"]
