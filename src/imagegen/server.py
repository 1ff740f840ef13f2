"""The composition root: reads settings, opens every resource in one exit stack,
wires services and servicers, serves gRPC and HTTP, and shuts down in order.

Shutdown on SIGTERM/SIGINT: health turns NOT_SERVING and new RPCs are refused
(UNAVAILABLE) while running ones finish within IMAGEGEN_SHUTDOWN_GRACE; workers
stop claiming, running jobs finish or go back to the queue; then everything closes
in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import httpx
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagegen.api.generation import ImageGenerationServicer
from imagegen.api.http import build_http_app, start_http_server
from imagegen.api.interceptors import (
    AuthInterceptor,
    DrainInterceptor,
    ErrorInterceptor,
    InflightInterceptor,
)
from imagegen.api.library import ImageLibraryServicer
from imagegen.api.templates import PromptTemplateServicer
from imagegen.api.usage import UsageServicer
from imagegen.config import ConfigError, Settings
from imagegen.domain.plans import PlanTable
from imagegen.domain.pricing import PriceTable
from imagegen.embedded import start_embedded_postgres
from imagegen.identity import TokenVerifier, resolve_jwt_key
from imagegen.imaging import EncodeSettings
from imagegen.jobs.runner import JobRunner
from imagegen.jobs.signals import JobSignals, NotificationListener
from imagegen.ports import bind_failure, ensure_ports_free
from imagegen.providers.base import Provider
from imagegen.providers.fetch_guard import FetchLimits, GuardedFetcher
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.local import LocalProvider
from imagegen.providers.openai import OpenAIProvider
from imagegen.providers.resilience import ResilientProvider
from imagegen.providers.sdwebui import SDWebUIProvider
from imagegen.repositories.db import BackendPids, connection_slots, open_pool
from imagegen.repositories.images import LibraryQueries
from imagegen.repositories.migrator import apply_migrations
from imagegen.repositories.templates import TemplateRepository
from imagegen.repositories.unit_of_work import PostgresDatabase
from imagegen.repositories.usage import UsageQueries
from imagegen.services.generations import (
    GenerationReads,
    GenerationWatch,
    JobPipeline,
    PipelineSettings,
    ProviderCatalogue,
    SubmissionService,
    SubmissionSettings,
    UserSettingsService,
)
from imagegen.services.library import LibraryService, LibrarySettings
from imagegen.services.sources import SourceLimits, SourceResolver
from imagegen.services.templates import TemplateService
from imagegen.services.usage import UsageService
from imagegen.storage.base import BlobStore
from imagegen.storage.local import LocalBlobStore, load_or_create_signing_key
from imagegen.storage.s3 import open_s3_store
from imagegen.telemetry import Telemetry, setup_telemetry
from imagegen.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name,
    library_pb2.DESCRIPTOR.services_by_name["ImageLibraryService"].full_name,
    templates_pb2.DESCRIPTOR.services_by_name["PromptTemplateService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
)


@dataclass
class RunningServer:
    """What a started server exposes to its owner (the CLI, or a test)."""

    grpc_port: int
    http_port: int
    settings: Settings
    telemetry: Telemetry


class Server:
    """One served process: call `run()` to serve until a signal arrives."""

    def __init__(self, settings: Settings, *, telemetry: Telemetry | None = None) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._stop_requested = asyncio.Event()
        self.running: RunningServer | None = None
        self._started = asyncio.Event()

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop_requested.set()

    async def wait_started(self) -> RunningServer:
        await self._started.wait()
        assert self.running is not None
        return self.running

    async def run(self, *, install_signal_handlers: bool = True) -> None:
        """Serve until request_stop() or SIGTERM/SIGINT, then shut down gracefully."""
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.request_stop)
        async with self._serving() as grpc_server:
            await self._stop_requested.wait()
            await self._shutdown(grpc_server)

    @contextlib.asynccontextmanager
    async def _serving(self) -> AsyncIterator[_GrpcHandle]:
        settings = self._settings
        # Before anything starts (the embedded PostgreSQL included): a busy port is one
        # line naming its setting, not a traceback after a database came up.
        ensure_ports_free(settings)
        async with contextlib.AsyncExitStack() as stack:
            telemetry = self._telemetry or setup_telemetry()
            if self._telemetry is None:
                stack.push_async_callback(telemetry.shutdown)
            dsn = settings.database_url
            if dsn is None:
                embedded = await start_embedded_postgres(settings.data_dir)
                stack.push_async_callback(embedded.stop)
                dsn = embedded.dsn
            await apply_migrations(dsn)
            # Workers and RPCs share one bounded pool: a statement holds a connection only
            # while it runs, so the worker count never decides how many connections we open.
            backend_pids = BackendPids()
            pool = await open_pool(
                dsn, max_size=settings.db_pool_size, backend_pids=backend_pids
            )
            stack.push_async_callback(pool.close)
            await check_connection_budget(pool, settings.db_pool_size)

            local_store: LocalBlobStore | None = None
            blobs: BlobStore
            if settings.s3 is not None:
                blobs = await stack.enter_async_context(open_s3_store(settings.s3))
            else:
                # The public URL needs the real HTTP port, known only after binding; the
                # store reads it lazily through this holder.
                local_store = LocalBlobStore(
                    root=settings.data_dir / "blobs",
                    public_url="",
                    signing_key=load_or_create_signing_key(settings.data_dir),
                )
                blobs = local_store

            http_client = httpx.AsyncClient(
                trust_env=False,
                timeout=httpx.Timeout(settings.provider_timeout.total_seconds(), connect=10.0),
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
            )
            stack.push_async_callback(http_client.aclose)
            sdwebui = SDWebUIProvider(settings.sdwebui_url, http_client)
            # Its models are the server's checkpoints, learned here (bounded, never fails
            # the start) so that submit can check a model name without a network call.
            await sdwebui.refresh_models()
            providers: dict[str, Provider] = {
                "local": LocalProvider(step_delay=settings.local_step_delay),
                "forge": ResilientProvider(
                    ForgeProvider(settings.forge.url, settings.forge.api_key, http_client)
                ),
                "openai": ResilientProvider(
                    OpenAIProvider(settings.openai_base_url, settings.openai_api_key, http_client)
                ),
                "sdwebui": ResilientProvider(sdwebui),
            }

            fetcher = GuardedFetcher(
                FetchLimits(
                    max_bytes=settings.max_input_bytes,
                    allow_hosts=frozenset(settings.fetch_allow_hosts),
                )
            )
            stack.push_async_callback(fetcher.aclose)

            signals = JobSignals()
            listener = NotificationListener(dsn, signals, own_pids=backend_pids)
            await listener.start()
            stack.push_async_callback(listener.stop)

            database = PostgresDatabase(pool)
            plans = PlanTable.load(settings.plans_file)
            prices = PriceTable.load(settings.pricing_file)
            catalogue = ProviderCatalogue(
                providers,
                default_provider=settings.effective_default_provider,
                fallback_providers=settings.fallback_providers,
            )
            submission = SubmissionService(
                db=database,
                sources=SourceResolver(
                    blobs,
                    database.images,
                    SourceLimits(settings.max_input_bytes, settings.max_pixels),
                    fetcher=fetcher,
                ),
                catalogue=catalogue,
                signals=signals,
                settings=SubmissionSettings(
                    plans=plans,
                    prices=prices,
                    max_pixels=settings.max_pixels,
                    request_id_ttl=settings.request_id_ttl,
                ),
                tracer=telemetry.tracer,
            )
            pipeline = JobPipeline(
                db=database,
                blobs=blobs,
                catalogue=catalogue,
                signals=signals,
                observer=telemetry.generation_metrics,
                settings=PipelineSettings(
                    plans=plans,
                    prices=prices,
                    max_pixels=settings.max_pixels,
                    provider_timeout=settings.provider_timeout,
                    max_attempts=settings.max_attempts,
                    encode=_encode_settings(settings),
                ),
                tracer=telemetry.tracer,
            )
            watch = GenerationWatch(
                db=database,
                blobs=blobs,
                signals=signals,
                plans=plans,
                runs_here=pipeline.runs_here,
                url_ttl=settings.url_ttl,
            )
            runner = JobRunner(
                database.generations,
                pipeline.execute,
                signals,
                workers=settings.workers,
                lease=settings.lease,
                max_attempts=settings.max_attempts,
            )

            verifier = TokenVerifier(
                resolve_jwt_key(settings.jwt, settings.data_dir),
                settings.jwt.algorithms,
                settings.jwt.issuer,
                settings.jwt.audience,
            )
            handle = _GrpcHandle()
            handle.watch = watch
            inflight = InflightInterceptor()
            handle.inflight = inflight
            max_message = settings.max_input_bytes + 1024 * 1024
            server = grpc.aio.server(
                interceptors=[
                    telemetry.grpc_server_interceptor(),
                    DrainInterceptor(lambda: handle.draining),
                    inflight,
                    AuthInterceptor(verifier),
                    ErrorInterceptor(),
                ],
                options=[
                    ("grpc.max_receive_message_length", max_message),
                    ("grpc.max_send_message_length", 16 * 1024 * 1024),
                    ("grpc.so_reuseport", 0),
                ],
            )
            generation_pb2_grpc.add_ImageGenerationServiceServicer_to_server(
                ImageGenerationServicer(
                    submission=submission,
                    reads=GenerationReads(
                        db=database, blobs=blobs, signals=signals, url_ttl=settings.url_ttl
                    ),
                    watch=watch,
                    user_settings=UserSettingsService(database.user_settings, catalogue),
                    url_ttl=settings.url_ttl,
                ),
                server,
            )
            library_pb2_grpc.add_ImageLibraryServiceServicer_to_server(
                ImageLibraryServicer(
                    LibraryService(
                        database.images,
                        LibraryQueries(pool),
                        blobs,
                        LibrarySettings(
                            url_ttl=settings.url_ttl,
                            max_pixels=settings.max_pixels,
                            chunk_bytes=settings.download_chunk_bytes,
                            encode=_encode_settings(settings),
                        ),
                    ),
                    url_ttl=settings.url_ttl,
                ),
                server,
            )
            templates_pb2_grpc.add_PromptTemplateServiceServicer_to_server(
                PromptTemplateServicer(
                    TemplateService(TemplateRepository(pool), submission),
                    url_ttl=settings.url_ttl,
                ),
                server,
            )
            usage_pb2_grpc.add_UsageServiceServicer_to_server(
                UsageServicer(
                    UsageService(
                        UsageQueries(pool), database.credits, plans, blobs, settings.url_ttl
                    )
                ),
                server,
            )
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            # The ports were free at start; these turn a port taken meanwhile into the same
            # one-line error, and the exit stack stops what was started.
            try:
                grpc_port = server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
            except RuntimeError as exc:
                raise bind_failure(
                    "IMAGEGEN_GRPC_PORT", settings.host, settings.grpc_port, exc
                ) from None
            if grpc_port == 0:
                raise bind_failure(
                    "IMAGEGEN_GRPC_PORT", settings.host, settings.grpc_port, RuntimeError()
                )

            http_app = build_http_app(local_store=local_store, metrics_text=telemetry.metrics_text)
            try:
                http_runner, http_port = await start_http_server(
                    http_app, settings.host, settings.http_port
                )
            except OSError as exc:
                raise bind_failure(
                    "IMAGEGEN_HTTP_PORT", settings.host, settings.http_port, exc
                ) from None
            stack.push_async_callback(http_runner.cleanup)
            if local_store is not None:
                local_store.public_url = (
                    settings.public_url or f"http://{_url_host(settings.host)}:{http_port}"
                ).rstrip("/")
                notice = public_url_notice(settings.host, settings.public_url, http_port)
                if notice is not None:
                    log.warning(notice, extra={"event": "server.public_url_unset"})

            await runner.start()
            telemetry.generation_metrics.register_queue_observer(lambda: runner.queue_stats)
            handle.runner = runner
            await server.start()
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            handle.server = server
            handle.health = health_servicer
            self.running = RunningServer(grpc_port, http_port, settings, telemetry)
            line = (
                f"imagegen listening grpc={settings.host}:{grpc_port} "
                f"http={settings.host}:{http_port}"
            )
            print(line, flush=True)
            if settings.ready_file is not None:
                settings.ready_file.write_text(line + "\n")
            log.info(line, extra={"event": "server.started"})
            self._started.set()
            try:
                yield handle
            finally:
                # Normally done by _shutdown; this covers a failure while serving.
                await server.stop(0)
                await runner.stop(0)

    async def _shutdown(self, handle: _GrpcHandle) -> None:
        grace = self._settings.shutdown_grace.total_seconds()
        deadline = time.monotonic() + grace
        log.info("shutting down", extra={"event": "server.draining", "grace_s": grace})
        handle.draining = True
        if handle.watch is not None:
            handle.watch.begin_drain()
        assert handle.health is not None and handle.server is not None
        for name in ("", *SERVICE_NAMES):
            await handle.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert handle.runner is not None
        runner_stop = asyncio.create_task(handle.runner.stop(max(deadline - time.monotonic(), 0)))
        # While new calls are refused and health says NOT_SERVING, in-flight RPCs (a
        # GenerateImage waiting for its job) get the rest of the grace to finish.
        assert handle.inflight is not None
        await handle.inflight.wait_idle(deadline - time.monotonic())
        await handle.server.stop(max(min(deadline - time.monotonic(), 1.0), 0.1))
        await runner_stop
        log.info("stopped", extra={"event": "server.stopped"})


class _GrpcHandle:
    def __init__(self) -> None:
        self.draining = False
        self.server: grpc.aio.Server | None = None
        self.health: Any = None
        self.runner: JobRunner | None = None
        self.inflight: InflightInterceptor | None = None
        self.watch: GenerationWatch | None = None


async def check_connection_budget(pool: asyncpg.Pool, pool_size: int) -> None:
    """Refuse to start a process whose pool (and listener connection) alone could take
    more connections than the database lets ordinary roles open."""
    max_connections, usable = await connection_slots(pool)
    if pool_size + 1 > usable:
        raise ConfigError(
            f"IMAGEGEN_DB_POOL_SIZE={pool_size} plus the listener connection exceeds the "
            f"{usable} connections the database allows (max_connections={max_connections} "
            "less its reserved slots); lower IMAGEGEN_DB_POOL_SIZE (workers share the pool, "
            "so IMAGEGEN_WORKERS does not need more connections) or raise max_connections"
        )


def public_url_notice(host: str, public_url: str | None, http_port: int) -> str | None:
    """The start-up line for a server that binds every interface but builds its signed
    URLs on loopback (no IMAGEGEN_PUBLIC_URL), which callers elsewhere cannot open."""
    if public_url or host not in _ANY_HOST:
        return None
    return (
        f"IMAGEGEN_HOST is {host or '(empty)'} but IMAGEGEN_PUBLIC_URL is not set: signed "
        f"image URLs start with http://{_url_host(host)}:{http_port}, which only this "
        "machine can open; set IMAGEGEN_PUBLIC_URL to the base URL callers reach"
    )


_ANY_HOST = ("0.0.0.0", "", "::")


def _encode_settings(settings: Settings) -> EncodeSettings:
    return EncodeSettings(
        png_compress_level=settings.png_compress_level,
        jpeg_quality=settings.jpeg_quality,
        webp_quality=settings.webp_quality,
        webp_effort=settings.webp_effort,
    )


def _url_host(host: str) -> str:
    if host in _ANY_HOST:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
