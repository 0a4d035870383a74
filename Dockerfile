# chatserver image.
#
#   docker build -t chatserver .
#   docker run --rm -p 8080:8080 -e CHAT_JWT_SECRET=... chatserver   # embedded default
#   docker run --rm -p 8080:8080 -e CHAT_ALLOW_DEV_AUTH=yes chatserver # dev auth, a throwaway
#
# Without CHAT_JWT_SECRET the server would run in dev auth mode (tokens for anyone); on the
# image's CHAT_HOST=0.0.0.0 that is refused at start-up (exit status 2) unless
# CHAT_ALLOW_DEV_AUTH=yes says so explicitly.
#
# Configuration is by CHAT_* environment variables only (README.md, "Settings"); the image sets
# CHAT_HOST, CHAT_PORT and CHAT_SQLITE_PATH. The server is PID 1 (exec-form CMD, no shell), so
# SIGTERM (`docker stop`) reaches it and it drains: /readyz answers 503, new WebSocket upgrades
# get 503, clients are told to reconnect elsewhere, replies finish, the outbox is flushed, exit 0.
# Give `docker stop --time` / compose `stop_grace_period` more than CHAT_SHUTDOWN_GRACE_S.
#
# PYTHON_IMAGE may name another Debian-based image that has `python` (with `-m venv`),
# `groupadd` and `useradd`: tests/system/test_image.py builds this file for real with buildah
# (`buildah bud --isolation chroot`) on a Debian 12 base made with debootstrap (python3,
# python3-venv, python-is-python3), and runs the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the locked dependencies, then the package ----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src
RUN python -m venv "$VIRTUAL_ENV"
# The dependencies: exactly the lock (hash-checked, prebuilt wheels only), in their own layer.
COPY requirements.lock ./
RUN "$VIRTUAL_ENV/bin/pip" install --require-hashes --only-binary=:all: --no-deps -r requirements.lock
# The package itself, not editable, without resolving anything again; then prove the set whole.
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY storage ./storage
COPY chatserver ./chatserver
COPY chatclient ./chatclient
COPY chatload ./chatload
RUN "$VIRTUAL_ENV/bin/pip" install --no-deps . && "$VIRTUAL_ENV/bin/pip" check

# ---- runtime: the virtualenv on a clean base, a non-root user ---------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 chat \
    && useradd --system --uid 10001 --gid chat --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin chat \
    && install -d -o chat -g chat -m 0750 /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHAT_HOST=0.0.0.0 \
    CHAT_PORT=8080 \
    CHAT_SQLITE_PATH=/data/chatserver.sqlite3
WORKDIR /data
USER 10001:10001
EXPOSE 8080
# Liveness: the process serves HTTP (readiness, /readyz, is for the load balancer).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHAT_PORT', '8080'), timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["chatserver", "serve"]
