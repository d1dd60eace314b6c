# streamrec worker image (CPU-only torch).
#   docker build -t streamrec .
#   docker run --rm -e STREAMREC_KAFKA_BOOTSTRAP_SERVERS=... -e STREAMREC_REDIS_URL=... streamrec worker
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: the repo's .venv, tests and caches stay out of the build context copy.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY stream_app ./stream_app
# torch==2.13.0 is pinned in pyproject.toml; the PyTorch CPU index serves 2.13.0+cpu, which
# satisfies the pin and wins over PyPI's CUDA build (no multi-GB CUDA libraries in the image).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
    && rm -rf /src

# Non-root, numeric UID so Kubernetes' runAsNonRoot can verify it. The home directory is the
# working directory: faust keeps its data dir in the cwd, and STREAMREC_DATA_DIR defaults to
# ~/.cache/streamrec.
RUN useradd --create-home --home-dir /home/streamrec --uid 10001 --user-group streamrec
USER 10001
WORKDIR /home/streamrec
# numba caches the compiled kernels; site-packages is read-only to this user (and the root
# filesystem in deploy/), the home directory is writable (an emptyDir in deploy/)
ENV NUMBA_CACHE_DIR=/home/streamrec/.cache/numba

# Exec form: the worker is PID 1 and receives SIGTERM itself, so it can snapshot before exiting.
ENTRYPOINT ["streamrec"]
CMD ["worker"]
