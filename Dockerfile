# syntax=docker/dockerfile:1
# tapefit: one uvicorn worker per container; scale with replicas (TensorFlow is not fork-safe).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tapefit
WORKDIR /src
# The locked dependencies first, in a layer of their own: a change to the code alone reuses it
# (TensorFlow is most of the image) instead of downloading and storing it again.
COPY requirements/run.lock ./
# An optional build secret "pip_ca" (a CA bundle) serves networks whose TLS to the package
# index is intercepted; nothing of it stays in the image.
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/tapefit/bin/pip install --no-cache-dir --no-compile --require-hashes --no-deps \
       -r run.lock
COPY pyproject.toml README.md ./
COPY service ./service
RUN /opt/tapefit/bin/pip install --no-cache-dir --no-compile --no-deps --no-build-isolation . \
    && find /opt/tapefit -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="tapefit" \
      org.opencontainers.image.description="Model fitting with custom TensorFlow training loops over HTTP"
RUN groupadd --system --gid 10001 tapefit \
    && useradd --system --uid 10001 --gid tapefit --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tapefit
COPY --from=build /opt/tapefit /opt/tapefit
ENV PATH=/opt/tapefit/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    KERAS_HOME=/tmp/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    TAPEFIT_HOST=0.0.0.0 \
    TAPEFIT_PORT=8000
USER 10001:10001
EXPOSE 8000
# No curl in the image: the health check is the image's own Python.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TAPEFIT_PORT', '8000') + '/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
