# The FlexLLM operator (kopf). Built from the same package as the worker, without torch:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/flexllm/flexllm-operator:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY operator operator
COPY worker worker
COPY kernels kernels
# Only the operator's runtime dependencies: the package itself is installed without its
# (torch, transformers, ...) dependencies, which the operator never imports.
RUN pip install --no-cache-dir --prefix=/install "kopf>=1.37" "kubernetes>=29" "redis>=5" "pydantic>=2.6" \
        "pyyaml>=6" \
 && pip install --no-cache-dir --prefix=/install --no-deps .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin flexllm
USER 1000:1000
ENV PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["python", "-m", "flexllm.operator"]
