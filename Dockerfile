# syntax=docker/dockerfile:1
# Multi-stage: build the wheel (with the generated contract inside), then run it
# as a non-root user. In production set DATABASE_URL and the IMAGEGEN_S3_* settings;
# without them the container uses the embedded PostgreSQL and local blobs in
# /var/lib/imagegen (mount a volume there).

FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY clients/python ./clients/python
COPY src ./src
COPY generated ./generated
COPY migrations ./migrations
# Two wheels: the server and the client it depends on (imagegen.client, imagegen.v1).
RUN python -m build --wheel --outdir /dist \
    && python -m build --wheel --outdir /dist clients/python

FROM python:3.11-slim AS runtime
# --- user and data directory -----------------------------------------------------------
# A fixed numeric uid/gid (10001): Kubernetes' runAsNonRoot can only verify a numeric
# USER, and deploy/kubernetes/ runs the pod as this uid.
RUN groupadd --system --gid 10001 imagegen \
    && useradd --system --uid 10001 --gid imagegen --create-home imagegen \
    && mkdir -p /var/lib/imagegen && chown imagegen:imagegen /var/lib/imagegen
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
USER 10001:10001
ENV IMAGEGEN_HOST=0.0.0.0 \
    IMAGEGEN_DATA_DIR=/var/lib/imagegen \
    PYTHONUNBUFFERED=1
# The only place the process writes (embedded PostgreSQL, local blobs, development key
# when DATABASE_URL / IMAGEGEN_S3_* / IMAGEGEN_JWT_KEY are unset); the root filesystem
# can stay read-only.
VOLUME ["/var/lib/imagegen"]
EXPOSE 50051 8088 8090

# --- health and stop -------------------------------------------------------------------
# `imagegen health` asks the server's own grpc.health.v1 service; it exits 1 from the
# moment a drain starts (NOT_SERVING), so the container turns unhealthy while it drains.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["imagegen", "health", "--timeout", "3"]
# SIGTERM starts the drain: running RPCs and jobs get IMAGEGEN_SHUTDOWN_GRACE (30 s by
# default) to finish. Docker's own stop timeout is 10 s, shorter than that: stop with
# `docker stop -t 45` (or `docker run --stop-timeout 45`, compose `stop_grace_period: 45s`),
# always above the grace, or the drain is cut off by SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["imagegen"]
CMD ["serve"]
