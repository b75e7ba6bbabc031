# syntax=docker/dockerfile:1
# The LoRA sidecar: sidecar.py and its JSON Schema on a slim Python, nothing else.
# One stage: every runtime dependency ships as a wheel, so there is no compiler
# or build tree to leave behind and a second stage would not make the image smaller.
# Python 3.12 here; the tests also run on 3.11 (pyproject target) - no code depends on either.
FROM python:3.12.12-slim-trixie

LABEL org.opencontainers.image.title="lora-sidecar" \
      org.opencontainers.image.description="Keeps a vLLM server's LoRA adapters equal to a mounted ConfigMap" \
      org.opencontainers.image.version="1.0.0"

# requirements.txt is bind-mounted for the install only: no layer of the image holds it.
# pip still byte-compiles the installed packages, which the read-only root file system
# could not cache later.
RUN --mount=type=bind,source=requirements.txt,target=/tmp/requirements.txt \
    pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore -r /tmp/requirements.txt

# s3:// sources need boto3 (35 MB installed), which sidecar.py imports only when it first fetches
# one: `docker build --build-arg WITH_S3=1` adds it; the default image stays as small as before.
ARG WITH_S3=0
RUN --mount=type=bind,source=requirements-s3.txt,target=/tmp/requirements-s3.txt \
    if [ "$WITH_S3" = "1" ]; then \
      pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore -r /tmp/requirements-s3.txt; \
    fi

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/app

# sidecar.py loads validation.yaml from its own folder, so both go to /app.
# Root owns them; the process only reads them. Not byte-compiled: compiling
# sidecar.py at start takes 52 ms of a 0.5 s start, once per container.
WORKDIR /app
COPY sidecar.py validation.yaml /app/

# A numeric user, so that Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 65532:65532

# /metrics, /healthz, /readyz, /status (--metrics-port).
EXPOSE 8080

# As a module, not as `python /app/sidecar.py`: CPython frees a script's syntax tree
# only when the script returns (pyrun_file frees the arena after run_mod), a module's
# right after compiling it. Measured at idle (Python 3.11, one adapter, no metrics
# port): 41.5 MB as a script, 35.7 MB as a module.
ENTRYPOINT ["python", "-m", "sidecar"]
