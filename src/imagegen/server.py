"""The composition root: reads settings, opens every resource in one exit stack,
wires services and servicers, serves gRPC and HTTP, and shuts down in order.

Shutdown on SIGTERM/SIGINT: new RPCs are refused (UNAVAILABLE) and readiness (gRPC
health and /readyz) turns NOT_SERVING while running RPCs finish within
IMAGEGEN_SHUTDOWN_GRACE; workers stop claiming, running jobs finish or go back to the
queue; then everything closes in reverse order. /healthz (liveness) stays 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import asyncpg
import grpc
import httpx
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imagegen.api.generation import ImageGenerationServicer
from imagegen.api.health import Readiness
from imagegen.api.http import build_http_app, start_http_server
from imagegen.api.interceptors import (
    AuthInterceptor,
    DrainInterceptor,
    ErrorInterceptor,
    InflightInterceptor,
)
from imagegen.api.library import ImageLibraryServicer
from imagegen.api.memory import HeapTrimmer, LargeRequestInterceptor, apply_malloc_policy
from imagegen.api.prompts import PromptAssistantServicer
from imagegen.api.templates import PromptTemplateServicer
from imagegen.api.usage import UsageServicer
from imagegen.api.webhooks import render_payload
from imagegen.config import ConfigError, ModerationSettings, Settings
from imagegen.domain.errors import Unauthenticated
from imagegen.domain.moderation import ModerationPolicyTable
from imagegen.domain.moderation_rules import RuleSet, readings
from imagegen.domain.phrases import builtin_phrases
from imagegen.domain.plans import PlanTable
from imagegen.domain.pricing import PriceTable
from imagegen.domain.webhooks import RetryPolicy
from imagegen.embedded import start_embedded_postgres
from imagegen.identity import TokenVerifier, resolve_jwt_key
from imagegen.imaging import EncodeSettings
from imagegen.jobs.runner import JobRunner
from imagegen.jobs.signals import JobSignals, NotificationListener
from imagegen.jobs.webhooks import WebhookWorker
from imagegen.ports import bind_failure, ensure_ports_free
from imagegen.provenance import open_marker
from imagegen.providers.base import Provider
from imagegen.providers.chat_enhancer import ChatEnhancer
from imagegen.providers.fetch_guard import FetchLimits, GuardedFetcher
from imagegen.providers.forge import ForgeProvider
from imagegen.providers.local import LocalProvider
from imagegen.providers.openai import OpenAIProvider
from imagegen.providers.openai_moderation import OpenAIModerator
from imagegen.providers.resilience import ResilientProvider
from imagegen.providers.rules_moderation import RulesModerator
from imagegen.providers.sdwebui import SDWebUIProvider
from imagegen.repositories.db import BackendPids, connection_slots, open_pool
from imagegen.repositories.images import LibraryQueries
from imagegen.repositories.migrator import apply_migrations
from imagegen.repositories.moderation import ModerationRepository
from imagegen.repositories.prompts import PromptCandidates
from imagegen.repositories.retention import RetentionRepository
from imagegen.repositories.templates import TemplateRepository
from imagegen.repositories.unit_of_work import PostgresDatabase
from imagegen.repositories.usage import UsageQueries
from imagegen.repositories.webhook_secrets import (
    SecretBox,
    WebhookSecretStore,
    load_or_create_dev_key,
)
from imagegen.services.generations import (
    BatchService,
    GenerationPresenter,
    GenerationReads,
    GenerationWaiter,
    GenerationWatch,
    JobPipeline,
    PipelineSettings,
    ProviderCatalogue,
    SubmissionService,
    SubmissionSettings,
    UserSettingsService,
    WaitSettings,
)
from imagegen.services.library import LibraryService, LibrarySettings
from imagegen.services.moderation import EnhancementScreen, ModerationService, Moderator
from imagegen.services.prompts import (
    EnhancementSettings,
    PromptEnhancement,
    PromptSuggestions,
)
from imagegen.services.retention import Reaper, RetentionService, RetentionSettings
from imagegen.services.sources import SourceLimits, SourceResolver
from imagegen.services.templates import TemplateService
from imagegen.services.usage import UsageService
from imagegen.services.webhooks.delivery import CallbackDelivery, DeliverySettings
from imagegen.services.webhooks.secrets import WebhookSecrets
from imagegen.storage.base import BlobStore
from imagegen.storage.local import LocalBlobStore, load_or_create_signing_key
from imagegen.storage.s3 import open_s3_store
from imagegen.telemetry import Telemetry, setup_telemetry
from imagegen.v1 import (
    generation_pb2,
    generation_pb2_grpc,
    library_pb2,
    library_pb2_grpc,
    prompts_pb2,
    prompts_pb2_grpc,
    templates_pb2,
    templates_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

if TYPE_CHECKING:
    from imagegen.mcp.http import McpHttpServer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    generation_pb2.DESCRIPTOR.services_by_name["ImageGenerationService"].full_name,
    library_pb2.DESCRIPTOR.services_by_name["ImageLibraryService"].full_name,
    templates_pb2.DESCRIPTOR.services_by_name["PromptTemplateService"].full_name,
    usage_pb2.DESCRIPTOR.services_by_name["UsageService"].full_name,
    prompts_pb2.DESCRIPTOR.services_by_name["PromptAssistantService"].full_name,
)


@dataclass
class RunningServer:
    """What a started server exposes to its owner (the CLI, or a test)."""

    grpc_port: int
    http_port: int
    settings: Settings
    telemetry: Telemetry
    mcp_port: int | None = None


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
        apply_malloc_policy(settings.malloc_mmap_threshold)
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
                dsn,
                max_size=settings.db_pool_size,
                tracer=telemetry.tracer,
                backend_pids=backend_pids,
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
            # Closed before the HTTP client (the stack unwinds last in, first out).
            stack.push_async_callback(sdwebui.aclose)
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

            moderators = await _moderators(settings.moderation, http_client)
            telemetry.moderation_metrics.moderators_configured([m.id for m in moderators])
            moderation = ModerationService(
                chain=moderators,
                policies=ModerationPolicyTable.load(settings.moderation.policy_file),
                repository=ModerationRepository(pool),
                observer=telemetry.moderation_metrics,
                store_text=settings.moderation.store_text,
            )

            # Signs a probe image, so signing material C2PA refuses stops the start here;
            # blocking (file I/O, a development CA made on first use), hence the thread.
            marker = await asyncio.to_thread(open_marker, settings.provenance, settings.data_dir)
            usage_notice = settings.provenance.usage_notice

            database = PostgresDatabase(pool)
            plans = PlanTable.load(settings.plans_file)
            reads = GenerationReads(
                db=database,
                blobs=blobs,
                signals=signals,
                url_ttl=settings.url_ttl,
                plans=plans,
            )
            webhook_secrets, deliveries = _webhooks(settings, pool, database, reads, stack)
            prices = PriceTable.load(settings.pricing_file)
            catalogue = ProviderCatalogue(
                providers,
                default_provider=settings.effective_default_provider,
                fallback_providers=settings.fallback_providers,
            )
            submission_settings = SubmissionSettings(
                plans=plans,
                prices=prices,
                max_pixels=settings.max_pixels,
                request_id_ttl=settings.request_id_ttl,
            )
            presenter = GenerationPresenter(db=database, blobs=blobs, url_ttl=settings.url_ttl)
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
                settings=submission_settings,
                presenter=presenter,
                tracer=telemetry.tracer,
                moderation=moderation,
                callbacks=deliveries,
            )
            batches = BatchService(
                db=database,
                submission=submission,
                catalogue=catalogue,
                signals=signals,
                settings=submission_settings,
                max_specs=settings.max_batch,
                presenter=presenter,
                moderation=moderation,
                callbacks=deliveries,
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
                    usage_notice=usage_notice,
                    encode=_encode_settings(settings),
                ),
                marker=marker,
                tracer=telemetry.tracer,
                moderation=moderation,
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
            max_message = receive_limit(settings.max_input_bytes)
            trimmer = HeapTrimmer()
            stack.push_async_callback(trimmer.aclose)
            server = grpc.aio.server(
                interceptors=[
                    telemetry.grpc_server_interceptor(),
                    LargeRequestInterceptor(trimmer),
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
            webhook_worker = WebhookWorker(
                database.webhooks,
                deliveries.deliver,
                concurrency=settings.webhooks.concurrency,
                # Past the attempt's own deadline, with room for recording it.
                lease=settings.webhooks.timeout * 2 + timedelta(seconds=10),
                poll_interval=settings.webhooks.poll_interval,
                signals=signals,
            )
            generation_pb2_grpc.add_ImageGenerationServiceServicer_to_server(
                ImageGenerationServicer(
                    submission=submission,
                    reads=reads,
                    watch=watch,
                    user_settings=UserSettingsService(database.user_settings, catalogue),
                    url_ttl=settings.url_ttl,
                    waiter=GenerationWaiter(
                        reads=reads,
                        watch=watch,
                        settings=WaitSettings(settings.wait_default, settings.wait_max),
                    ),
                    webhook_secrets=webhook_secrets,
                    batches=batches,
                    usage_notice=usage_notice,
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
                            usage_notice=usage_notice,
                            chunk_bytes=settings.download_chunk_bytes,
                            encode=_encode_settings(settings),
                        ),
                        marker,
                    ),
                    url_ttl=settings.url_ttl,
                    usage_notice=usage_notice,
                ),
                server,
            )
            templates_pb2_grpc.add_PromptTemplateServiceServicer_to_server(
                PromptTemplateServicer(
                    TemplateService(
                        TemplateRepository(pool),
                        submission,
                        request_id_ttl=settings.request_id_ttl,
                    ),
                    url_ttl=settings.url_ttl,
                    usage_notice=usage_notice,
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
            enhance = settings.enhance
            phrases = builtin_phrases()
            prompts_pb2_grpc.add_PromptAssistantServiceServicer_to_server(
                PromptAssistantServicer(
                    PromptSuggestions(PromptCandidates(pool), phrases=phrases),
                    PromptEnhancement(
                        db=database,
                        chat=ChatEnhancer(
                            enhance.url,
                            enhance.model or "",
                            http_client,
                            api_key=enhance.api_key,
                            timeout=enhance.timeout.total_seconds(),
                        )
                        if enhance.url
                        else None,
                        phrases=phrases,
                        # The moderation use case takes this seam's place once it exists.
                        screen=EnhancementScreen(moderation),
                        settings=EnhancementSettings(plans=plans, prices=prices),
                    ),
                ),
                server,
            )
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            readiness = Readiness(health_servicer, ("", *SERVICE_NAMES))
            handle.readiness = readiness
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

            http_app = build_http_app(
                local_store=local_store,
                metrics_text=telemetry.metrics_text,
                is_ready=lambda: readiness.ready,
            )
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
            # Owned by the stack from here: a start that fails below (a taken MCP port)
            # stops them before the pool they use closes.
            stack.push_async_callback(runner.stop, 0)
            telemetry.generation_metrics.register_queue_observer(lambda: runner.queue_stats)
            handle.runner = runner
            await webhook_worker.start()
            stack.push_async_callback(webhook_worker.stop, 0)
            handle.webhooks = webhook_worker
            if settings.gc.interval is not None:
                reaper = Reaper(
                    RetentionService(
                        RetentionRepository(pool),
                        blobs,
                        plans,
                        RetentionSettings(
                            batch_size=settings.gc.batch_size,
                            orphan_grace=settings.gc.orphan_grace,
                            sweep_interval=settings.gc.sweep_interval,
                        ),
                    ),
                    settings.gc.interval,
                )
                await reaper.start()
                # Stopped before the pool and the blob store close (the stack unwinds in
                # reverse).
                stack.push_async_callback(reaper.stop)
            await server.start()
            stack.push_async_callback(server.stop, 0)
            # Migrations, the listener, the workers and both servers are up.
            await readiness.serving()
            handle.server = server
            handle.mcp = await _start_mcp(settings, grpc_port, verifier, stack)
            mcp_port = handle.mcp.port if handle.mcp is not None else None
            self.running = RunningServer(grpc_port, http_port, settings, telemetry, mcp_port)
            line = (
                f"imagegen listening grpc={settings.host}:{grpc_port} "
                f"http={settings.host}:{http_port}"
            ) + (f" mcp={settings.host}:{mcp_port}" if mcp_port is not None else "")
            print(line, flush=True)
            if settings.ready_file is not None:
                settings.ready_file.write_text(line + "\n")
            log.info(line, extra={"event": "server.started"})
            self._started.set()
            # What _shutdown does not stop (a failure while serving, or a start that
            # failed part way) the stack stops: the gRPC server, then the workers.
            yield handle

    async def _shutdown(self, handle: _GrpcHandle) -> None:
        grace = self._settings.shutdown_grace.total_seconds()
        deadline = time.monotonic() + grace
        log.info("shutting down", extra={"event": "server.draining", "grace_s": grace})
        assert handle.readiness is not None and handle.server is not None
        handle.draining = True
        # /readyz and gRPC health say not ready from here on.
        await handle.readiness.draining()
        if handle.watch is not None:
            handle.watch.begin_drain()
        assert handle.runner is not None
        runner_stop = asyncio.create_task(handle.runner.stop(max(deadline - time.monotonic(), 0)))
        assert handle.webhooks is not None
        webhooks_stop = asyncio.create_task(
            handle.webhooks.stop(max(deadline - time.monotonic(), 0))
        )
        # MCP requests go through this process's gRPC port, so they drain before it stops.
        mcp_stop = asyncio.create_task(
            handle.mcp.stop(max(deadline - time.monotonic() - 1.0, 0.1))
            if handle.mcp is not None
            else asyncio.sleep(0)
        )
        # While new calls are refused and health says NOT_SERVING, in-flight RPCs (a
        # GenerateImage waiting for its job) get the rest of the grace to finish.
        assert handle.inflight is not None
        await handle.inflight.wait_idle(deadline - time.monotonic())
        await mcp_stop
        await handle.server.stop(max(min(deadline - time.monotonic(), 1.0), 0.1))
        await runner_stop
        await webhooks_stop
        log.info("stopped", extra={"event": "server.stopped"})


class _GrpcHandle:
    def __init__(self) -> None:
        self.draining = False
        self.server: grpc.aio.Server | None = None
        self.readiness: Readiness | None = None
        self.runner: JobRunner | None = None
        self.webhooks: WebhookWorker | None = None
        self.inflight: InflightInterceptor | None = None
        self.watch: GenerationWatch | None = None
        self.mcp: McpHttpServer | None = None


async def _start_mcp(
    settings: Settings,
    grpc_port: int,
    verifier: TokenVerifier,
    stack: contextlib.AsyncExitStack,
) -> McpHttpServer | None:
    """MCP over Streamable HTTP (IMAGEGEN_MCP_PORT), an adapter over this process's own
    gRPC port on loopback: it goes through the same interceptors and use cases."""
    if settings.mcp.port is None:
        return None
    from imagegen.mcp import McpHttpServer
    from imagegen.mcp.backend import Backend
    from imagegen.mcp.tools import McpOptions

    def authenticate(token: str) -> bool:
        try:
            verifier.verify(token)
        except Unauthenticated:
            return False
        return True

    backend = Backend(f"{_url_host(settings.host)}:{grpc_port}")
    stack.push_async_callback(backend.close)
    mcp = McpHttpServer(
        backend,
        McpOptions(default_wait=settings.mcp.default_wait, max_wait=settings.mcp.max_wait),
        host=settings.host,
        port=settings.mcp.port,
        authenticate=authenticate,
        # A data: URI source is base64 (4/3 of the bytes) inside JSON.
        max_body_bytes=receive_limit(settings.max_input_bytes),
    )
    try:
        await mcp.start()
    except OSError as exc:
        raise bind_failure("IMAGEGEN_MCP_PORT", settings.host, settings.mcp.port, exc) from None
    stack.push_async_callback(mcp.stop, 0.0)
    return mcp


def _webhooks(
    settings: Settings,
    pool: asyncpg.Pool,
    database: PostgresDatabase,
    reads: GenerationReads,
    stack: contextlib.AsyncExitStack,
) -> tuple[WebhookSecrets, CallbackDelivery]:
    """Users' signing secrets (encrypted with IMAGEGEN_WEBHOOK_KEY), and callbacks sent
    through a fetch guard of their own: its allowlist is the deployment's, its deadline
    the attempt's, and it reads little of an answer."""
    key = settings.webhooks.key
    if key is None:
        key = load_or_create_dev_key(settings.data_dir)
        if settings.database_url is not None:
            log.warning(
                "IMAGEGEN_WEBHOOK_KEY is not set: webhook secrets are encrypted with a key "
                "in this data directory; replicas sharing the database need the same "
                "IMAGEGEN_WEBHOOK_KEY",
                extra={"event": "server.webhook_key_unset"},
            )
    secrets = WebhookSecrets(
        WebhookSecretStore(pool, SecretBox(key)),
        grace=settings.webhooks.secret_grace,
        request_id_ttl=settings.request_id_ttl,
    )
    allow_hosts = frozenset(settings.fetch_allow_hosts)
    sender = GuardedFetcher(
        FetchLimits(
            max_bytes=WEBHOOK_ANSWER_BYTES,
            timeout=settings.webhooks.timeout.total_seconds(),
            max_redirects=0,
            allow_hosts=allow_hosts,
        )
    )
    stack.push_async_callback(sender.aclose)
    deliveries = CallbackDelivery(
        db=database,
        reads=reads,
        secrets=secrets,
        sender=sender,
        render=functools.partial(
            render_payload,
            url_ttl=settings.url_ttl,
            usage_notice=settings.provenance.usage_notice,
        ),
        settings=DeliverySettings(
            retry=RetryPolicy(settings.webhooks.retry_delays, settings.webhooks.max_attempts),
            allow_hosts=allow_hosts,
        ),
        batch_jobs=reads.batch_jobs,
    )
    return secrets, deliveries


#: How much of a receiver's answer is read (only its status counts).
WEBHOOK_ANSWER_BYTES = 64 * 1024


async def _moderators(
    settings: ModerationSettings, http_client: httpx.AsyncClient
) -> list[Moderator]:
    """The moderator chain in the configured order."""
    chain: list[Moderator] = []
    for moderator_id in settings.chain:
        if moderator_id == "rules":
            rules = await asyncio.to_thread(_load_rules, settings)
            chain.append(RulesModerator(rules))
        elif moderator_id == "openai":
            assert settings.url is not None  # Settings.from_env refuses a chain without it
            chain.append(
                OpenAIModerator(
                    settings.url, settings.api_key, http_client, timeout=settings.timeout
                )
            )
    return chain


def _load_rules(settings: ModerationSettings) -> RuleSet:
    rules = RuleSet.load(settings.rules_file)
    readings("warm up")  # loads the confusables table here, not in the first request
    return rules


def receive_limit(max_input_bytes: int) -> int:
    """gRPC's receive limit for IMAGEGEN_MAX_INPUT_BYTES: room for a source just over the
    limit written as a base64 `data:` URL (4/3 of its bytes) plus the rest of the
    request, so such a source reaches our own check and is refused as IMG_007 with an
    ErrorInfo; only a message far beyond it is refused by the transport."""
    return max_input_bytes * 4 // 3 + 1024 * 1024


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
