# syntax=docker/dockerfile:1
# One image for both processes: `python -m hub` (the default) and `python -m producer` (override the command).

# Both stages use the same base: the virtual environment's python is a link to this image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the locked dependencies, then the project, into a virtual environment that the runtime stage copies --
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# The lock alone first, so that a change to the code does not invalidate the dependency layer.
COPY requirements.lock ./
RUN pip install --require-virtualenv -r requirements.lock

COPY pyproject.toml README.md ./
COPY ssecore ./ssecore
COPY hub ./hub
COPY producer ./producer
COPY loadtest ./loadtest
# --no-deps: the lock already installed every dependency, at the versions the tests ran with.
RUN pip install --require-virtualenv --no-deps . && pip check

# -- runtime: the virtual environment on a clean base; no build tools, no sources, no pip cache --
FROM ${PYTHON_IMAGE} AS runtime

# PYTHONSAFEPATH: `python -m` does not put the working directory on sys.path, so nothing there can shadow a module.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONSAFEPATH=1 \
    PATH=/opt/venv/bin:$PATH

# A numeric, non-root user: Kubernetes' runAsNonRoot can only verify a numeric USER. Its uid is the one
# k8s/hub-deployment.yaml runs as.
RUN groupadd --system --gid 10001 hub \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hub

# Root-owned and so read-only to the process; the bytecode was compiled at install, so nothing is written at run time
# (Kubernetes runs it with a read-only root filesystem).
COPY --from=build /opt/venv /opt/venv

# Created before USER, so root-owned: an empty working directory the process cannot write to.
WORKDIR /app
USER 10001:10001

# The hub's default --port; the producer's metrics are on its --metrics-port (9101).
EXPOSE 8080

# Slim images have no curl. HUB_PORT follows the hub's own setting; a producer container sets
# HEALTHCHECK_URL=http://127.0.0.1:9101/healthz. Kubernetes ignores this and uses the manifests' probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL') or 'http://127.0.0.1:%s/healthz' % (os.environ.get('HUB_PORT') or '8080'), timeout=2)"]

# python is PID 1 and handles SIGTERM itself: the hub drains (readiness 503, streams ended spread over the grace
# period), the worker finishes or hands back its generations. Give `docker stop` more than --grace: `-t 15`.
CMD ["python", "-m", "hub"]
