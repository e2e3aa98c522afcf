# The settler worker image: `docker build -t settler .` (docker-compose.yml builds it too).
# Starts by applying the schema (idempotent: CREATE ... IF NOT EXISTS), then runs the worker;
# every setting comes from SETTLER_* environment variables (see `settler run --help`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SETTLER_METRICS_HOST=0.0.0.0 \
    SETTLER_METRICS_PORT=9108 \
    SETTLER_LOG_FORMAT=json

WORKDIR /app

# Dependencies first, so a code change does not re-download them.
COPY pyproject.toml README.md ./
COPY settler ./settler
RUN pip install . && python -c "import settler.cli"

# settler.schema reads /app/schema (beside the package), or $SETTLER_SCHEMA_DIR.
COPY schema ./schema
ENV SETTLER_SCHEMA_DIR=/app/schema

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin settler
USER settler

EXPOSE 9108
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2); sys.exit(0)"]

# exec: the worker is PID 1's only child and gets SIGTERM directly (drain, commit, exit 0).
CMD ["sh", "-c", "settler schema apply && exec settler run"]
