# The image the manifests in deploy/k8s/ name: vault-sandbox:0.1.0
#   docker build -t vault-sandbox:0.1.0 .
# One image for the key server and the worker service (`vault keyserver
# serve`, `vault worker serve`); it runs as an unprivileged user, with a
# read-only root file system (nothing is written outside /tmp).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vault ./vault
COPY worker ./worker
COPY keyserver ./keyserver
# a root-owned install the service user cannot change (workers start with -I from it)
RUN pip install . && rm -rf /src \
    && groupadd --system --gid 10001 vault \
    && useradd --system --uid 10001 --gid vault --home-dir /nonexistent --shell /usr/sbin/nologin vault

USER 10001:10001
WORKDIR /
# the key server (7700); the service: ZeroMQ (7701), sealed calls (7702), metrics (9100),
# the Open Inference Protocol over HTTP (8000) and gRPC (8001)
EXPOSE 7700 7701 7702 8000 8001 9100
ENTRYPOINT ["vault"]
CMD ["--help"]
