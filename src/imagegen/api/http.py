"""The HTTP side of a served process: signed blob URLs of the local store,
`/metrics` in Prometheus format, a liveness probe (`/healthz`) and a readiness probe
(`/readyz`)."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote

from aiohttp import web

from imagegen.domain.errors import NotFound
from imagegen.services.blob_files import MalformedSignedUrl, SignedBlobFiles, parse_signed_query

MetricsText = Callable[[], tuple[bytes, str]]


def build_http_app(
    *,
    local_store: SignedBlobFiles | None,
    metrics_text: MetricsText,
    is_ready: Callable[[], bool] = lambda: True,
) -> web.Application:
    """Routes: GET /blobs/{key} (local store only), GET /metrics, GET /healthz, GET /readyz.

    `/healthz` is liveness: 200 while the process can finish its work, drains included.
    `/readyz` is readiness: 200 while `is_ready()` (api/health.py's Readiness: up, and not
    draining), 503 otherwise. A blob URL whose expires or signature is missing or
    malformed is 400, one whose signature is not ours or that has expired is 403, a key
    with no file is 404."""
    app = web.Application()

    async def metrics(_request: web.Request) -> web.Response:
        body, content_type = metrics_text()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_request: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready: starting or draining\n")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    if local_store is not None:
        store = local_store

        async def blob(request: web.Request) -> web.StreamResponse:
            key = unquote(request.match_info["key"])
            try:
                expires, signature = parse_signed_query(
                    request.query.get("expires"), request.query.get("signature")
                )
            except MalformedSignedUrl as exc:
                raise web.HTTPBadRequest(text=f"{exc}\n") from None
            if not store.verify(key, expires, signature):
                if store.signature_matches(key, expires, signature):
                    raise web.HTTPForbidden(text="this link has expired; ask for a fresh URL\n")
                raise web.HTTPForbidden(text="this link's signature is not valid\n")
            try:
                path = store.file_for_serving(key)
            except NotFound:
                raise web.HTTPNotFound(text="no such image\n") from None
            response = web.FileResponse(path)
            response.headers["Content-Type"] = store.content_type(key)
            response.headers["Cache-Control"] = f"private, max-age={store.seconds_left(expires)}"
            return response

        app.router.add_get("/blobs/{key:.+}", blob)
    return app


async def start_http_server(
    app: web.Application, host: str, port: int
) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 for a free port); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    sockets = getattr(site._server, "sockets", None)
    if sockets:
        bound = sockets[0].getsockname()[1]
    return runner, bound
