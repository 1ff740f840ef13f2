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
RUN groupadd --system imagegen && useradd --system --gid imagegen --create-home imagegen \
    && mkdir -p /var/lib/imagegen && chown imagegen:imagegen /var/lib/imagegen
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
USER imagegen
ENV IMAGEGEN_HOST=0.0.0.0 \
    IMAGEGEN_DATA_DIR=/var/lib/imagegen \
    PYTHONUNBUFFERED=1
EXPOSE 50051 8088
STOPSIGNAL SIGTERM
ENTRYPOINT ["imagegen"]
CMD ["serve"]
