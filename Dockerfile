# syntax=docker/dockerfile:1
# EnginEdge Main Hexagon, production image (README "Deployment").
#
#   docker build -t enginedge/main-hexagon:latest .
#   docker run -p 3000:3000 enginedge/main-hexagon:latest                      # the service
#   docker run enginedge/main-hexagon:latest enginedge worker --type data-processing
#
# Stage 1 builds the project's wheel and installs it, with the dependencies pinned in
# pyproject.toml, into a virtual environment; stage 2 copies only that environment onto a
# fresh slim base with tini as PID 1 and runs as uid/gid 1001.
# tests/deploy/test_container_like.py installs the wheel the same way and runs this file's
# ENV, USER and ENTRYPOINT + CMD as they are written here: keep them in the simple forms below.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install /wheels/enginedge-*.whl

FROM ${PYTHON_IMAGE} AS production
# tini forwards SIGTERM to the service (which then drains and exits 0) and reaps zombies.
# The version is Debian 12's (bookworm, the base above).
ARG TINI_VERSION=0.19.0-1+b3
RUN apt-get update \
    && apt-get install -y --no-install-recommends "tini=${TINI_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 1001 enginedge \
    && useradd --system --uid 1001 --gid 1001 --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin enginedge \
    && mkdir -p /app /var/lib/enginedge \
    && chown 1001:1001 /app /var/lib/enginedge
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=3000 \
    ENGINEDGE_DATA_DIR=/var/lib/enginedge
USER 1001:1001
# 3000: the service's HTTP API and probes; 8081: `enginedge worker`'s own /health.
EXPOSE 3000 8081
ENTRYPOINT ["tini", "--"]
CMD ["enginedge", "serve"]
