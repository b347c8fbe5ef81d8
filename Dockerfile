# gsmkit on a CUDA GPU.
#
# Build (from the repository root):
#   docker build -t gsmkit .
#   docker build -t gsmkit:vllm --build-arg GSMKIT_EXTRAS=vllm .     # with the vLLM backend
#
# Run: the image's entry point is `gsmkit`, so arguments are a gsmkit command line. Mount the data,
# the model and an output folder; --gpus all needs the NVIDIA Container Toolkit on the host.
#   docker run --rm --gpus all \
#     -v "$PWD/../shared/data/gsm8k:/data/gsm8k:ro" \
#     -v "$PWD/models:/models:ro" \
#     -v "$PWD/runs:/runs" \
#     gsmkit fewshot --data /data/gsm8k --out /runs/pool.jsonl
#   docker run --rm --gpus all -v ... gsmkit eval gsm8k --model /models/my-model --data /data/gsm8k \
#     --pool /runs/pool.jsonl --k 5 --dtype bfloat16 --batch-size 64 --out /runs/eval
#
# To use Hub ids (--model org/name, --data openai/gsm8k) instead of mounted folders, the container needs
# network access; mount a cache to keep downloads between runs: -v "$HOME/.cache/huggingface:/root/.cache/huggingface".
# Files written under /runs belong to root; add --user "$(id -u):$(id -g)" to get them as yourself.

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ARG GSMKIT_EXTRAS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 from Ubuntu 22.04's own archive, in a virtual environment so pip never touches the system Python.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && pip install --upgrade pip

# Only what the package build needs (pyproject.toml names README.md as the long description).
# PyPI's Linux torch wheel is a CUDA build that brings its own CUDA libraries; the host needs an NVIDIA
# driver recent enough for it.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gsmkit ./gsmkit
RUN pip install ".${GSMKIT_EXTRAS:+[$GSMKIT_EXTRAS]}" && gsmkit --version

WORKDIR /runs
ENTRYPOINT ["gsmkit"]
CMD ["--help"]
