# shop-service image. Build:  docker build -t shop-service .
# Run against your PostgreSQL (migrate once, then serve):
#   docker run --rm -e SHOP_DATABASE_URL=postgresql+asyncpg://user:pw@db:5432/shop shop-service \
#       python -m service migrate
#   docker run -d -p 50051:50051 -e SHOP_DATABASE_URL=... -e SHOP_PAGE_TOKEN_SECRET=... \
#       -e SHOP_AUTH_TOKENS=... shop-service
# Without Docker: `make image` (podman, on a base made by debootstrap: deploy/image/).

# Any Debian bookworm image with Python 3.11, its venv module, its headers and `python` will do:
# deploy/image/base.py makes one where no registry answers.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: the project and its dependencies in /opt/venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# gcc builds StreamUsers' compiled batch encoder (setup.py; checked below).
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The runtime dependencies exactly as locked (`make lock`), each file's hash checked; then the
# project alone, its dependencies already there.
COPY requirements/runtime.lock ./requirements/
RUN pip install --upgrade pip \
 && pip install --require-hashes -r requirements/runtime.lock
COPY pyproject.toml setup.py README.md ./
COPY service ./service
COPY generated ./generated
RUN pip install --no-deps . \
 && python setup.py build_ext --inplace
# setup.py's extension is optional, so a missing compiler or Python.h would only print a
# warning and leave the service on the slower upb path: here that fails the build instead.
RUN python -c "from service.api.users_encode import COMPILED; assert COMPILED, 'no compiled encoder'"

# ---- runtime: the venv plus the source the service reads at run time ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system shop \
 && useradd --system --gid shop --home-dir /app --no-create-home --shell /usr/sbin/nologin shop \
 && mkdir -p /var/lib/shop \
 && chown shop:shop /var/lib/shop
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# alembic/ and alembic.ini sit next to service/: `python -m service migrate` finds them there.
# service/ from the builder: it holds the compiled encoder built in place.
COPY --from=builder /src/service ./service
COPY generated ./generated
COPY alembic ./alembic
COPY alembic.ini ./
# SHOP_GRPC_HOST=0.0.0.0 is beyond loopback: `serve` exits with status 2 unless the container
# gets SHOP_PAGE_TOKEN_SECRET (the built-in one is public) and SHOP_AUTH_TOKENS (or, to serve
# without tokens on purpose, SHOP_ALLOW_INSECURE=true).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHOP_GRPC_HOST=0.0.0.0 \
    SHOP_GRPC_PORT=50051 \
    SHOP_DATA_DIR=/var/lib/shop
USER shop
EXPOSE 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = os.environ.get('SHOP_GRPC_PORT', '50051'); r = g.HealthStub(grpc.insecure_channel(f'127.0.0.1:{port}')).Check(h.HealthCheckRequest(), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# Exec form: the server is PID 1 and gets SIGTERM itself (graceful stop, SHOP_SHUTDOWN_GRACE).
CMD ["python", "-m", "service", "serve"]
