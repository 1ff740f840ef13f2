"""Settings, read once from the environment by the composition root.

Every setting is declared in `SETTINGS` with its variable, default and meaning;
the README's configuration table is generated from that list (scripts/config_table.py),
so the two cannot drift.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

MAX_URL_TTL = timedelta(days=7)
MIN_WEBHOOK_KEY_CHARS = 32
#: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h: 23.7 hours in all.
DEFAULT_WEBHOOK_RETRY_DELAYS = "5,30,120,600,1800,3600,7200,14400,28800,28800"
MAX_USAGE_NOTICE_CHARS = 2000
#: The largest IMAGEGEN_MAX_BATCH: a batch is accepted in one transaction, under its
#: user's lock.
MAX_BATCH = 1000
#: What images say about themselves when a deployment sets no IMAGEGEN_USAGE_NOTICE.
DEFAULT_USAGE_NOTICE = (
    "This image was generated or edited with AI (imagegen). It may resemble existing "
    "works or people; use it only as the terms of the service that produced it allow."
)


@dataclass(frozen=True)
class SettingDoc:
    """One environment variable: its name, default (as text) and meaning."""

    name: str
    default: str
    meaning: str


SETTINGS: tuple[SettingDoc, ...] = (
    SettingDoc(
        "IMAGEGEN_DATA_DIR",
        "~/.local/share/imagegen",
        "Data directory: embedded PostgreSQL, local blobs, development JWT key and C2PA CA.",
    ),
    SettingDoc("IMAGEGEN_HOST", "127.0.0.1", "Address the gRPC and HTTP servers bind."),
    SettingDoc("IMAGEGEN_GRPC_PORT", "50051", "gRPC port; 0 binds a free port."),
    SettingDoc(
        "IMAGEGEN_HTTP_PORT",
        "8088",
        "HTTP port for signed blob URLs (local store) and `/metrics`; 0 binds a free port.",
    ),
    SettingDoc(
        "IMAGEGEN_MCP_PORT",
        "(unset: off)",
        "Port of MCP over Streamable HTTP at `/mcp` (same bearer JWT as gRPC); 0 binds a "
        "free port.",
    ),
    SettingDoc(
        "IMAGEGEN_MCP_WAIT",
        "30",
        "MCP: seconds a job tool waits for its job when the call names no `wait_seconds`.",
    ),
    SettingDoc(
        "IMAGEGEN_MCP_MAX_WAIT",
        "55",
        "MCP: most seconds any tool call waits for a job (`wait_seconds` above it is cut "
        "to it); below common 60 s client timeouts.",
    ),
    SettingDoc(
        "IMAGEGEN_WAIT_DEFAULT",
        "30",
        "WaitGeneration: seconds it waits for the job when the request names no timeout.",
    ),
    SettingDoc(
        "IMAGEGEN_WAIT_MAX",
        "120",
        "WaitGeneration: most seconds it waits (a longer timeout is cut to it; the caller's "
        "gRPC deadline also bounds it).",
    ),
    SettingDoc(
        "IMAGEGEN_PUBLIC_URL",
        "http://HOST:HTTP_PORT",
        "Base URL that local-store signed URLs start with.",
    ),
    SettingDoc(
        "IMAGEGEN_READY_FILE",
        "(unset)",
        "If set, the `imagegen listening ...` line is also written to this file.",
    ),
    SettingDoc(
        "DATABASE_URL",
        "(embedded PostgreSQL)",
        "PostgreSQL DSN; unset starts the embedded server in the data directory.",
    ),
    SettingDoc(
        "IMAGEGEN_S3_ENDPOINT",
        "(unset: local blob store)",
        "S3 endpoint URL; setting it (or the bucket) switches blobs to S3.",
    ),
    SettingDoc("IMAGEGEN_S3_BUCKET", "imagegen", "S3 bucket."),
    SettingDoc("IMAGEGEN_S3_REGION", "us-east-1", "S3 region."),
    SettingDoc("IMAGEGEN_S3_PREFIX", "(empty)", "Key prefix inside the bucket."),
    SettingDoc(
        "IMAGEGEN_URL_TTL",
        "900",
        "Lifetime of signed image URLs in seconds (at most 604800, 7 days).",
    ),
    SettingDoc(
        "IMAGEGEN_SHUTDOWN_GRACE",
        "30",
        "Seconds running RPCs and jobs get to finish after SIGTERM.",
    ),
    SettingDoc(
        "IMAGEGEN_JWT_KEY",
        "(development key in the data directory)",
        "Key that verifies JWTs (HMAC secret, or PEM public key for RS/ES).",
    ),
    SettingDoc("IMAGEGEN_JWT_ALGORITHMS", "HS256", "Comma-separated accepted JWT algorithms."),
    SettingDoc("IMAGEGEN_JWT_ISSUER", "(unchecked)", "Required `iss` claim, if set."),
    SettingDoc("IMAGEGEN_JWT_AUDIENCE", "(unchecked)", "Required `aud` claim, if set."),
    SettingDoc(
        "IMAGEGEN_C2PA_CERT",
        "(development CA in the data directory)",
        "C2PA signing certificate chain, leaf first, as PEM text or a path to a PEM file.",
    ),
    SettingDoc(
        "IMAGEGEN_C2PA_KEY",
        "(development key in the data directory)",
        "Private key of the C2PA signing certificate, as PEM text or a path to a PEM file.",
    ),
    SettingDoc(
        "IMAGEGEN_USAGE_NOTICE",
        "(a notice that the image was made with AI)",
        f"Usage notice put in every image's XMP (`dc:rights`, `xmpRights:UsageTerms`); "
        f"at most {MAX_USAGE_NOTICE_CHARS} characters.",
    ),
    SettingDoc(
        "IMAGEGEN_DEFAULT_PROVIDER",
        "forge if configured, else local",
        "Provider id used when a request names none.",
    ),
    SettingDoc(
        "IMAGEGEN_FALLBACK_PROVIDERS",
        "(none)",
        "Comma-separated providers tried in order when the chosen one is unavailable.",
    ),
    SettingDoc(
        "IMAGEGEN_FETCH_ALLOW_HOSTS",
        "(empty)",
        "Comma-separated hosts that server-side URL fetches may reach despite the guard.",
    ),
    SettingDoc(
        "IMAGEGEN_MAX_PIXELS",
        "16777216",
        "Largest image (width x height) decoded, from a provider or a caller.",
    ),
    SettingDoc(
        "IMAGEGEN_MAX_INPUT_BYTES",
        "20971520",
        "Largest source image accepted, in bytes; also sets gRPC's receive limit.",
    ),
    SettingDoc(
        "IMAGEGEN_MALLOC_MMAP_THRESHOLD",
        "4194304",
        "glibc only: allocations of this many bytes or more get their own mmap, returned to "
        "the OS when freed, so large requests leave no resident memory behind (and twice it "
        "may stay free atop the heap); 0 keeps glibc's rising threshold.",
    ),
    SettingDoc(
        "IMAGEGEN_DOWNLOAD_CHUNK_BYTES",
        "1048576",
        "Chunk size of DownloadImage streams in bytes (at most 1 MiB).",
    ),
    SettingDoc(
        "IMAGEGEN_PNG_COMPRESS_LEVEL",
        "6",
        "zlib level (0-9) of PNGs the service encodes; a reply already in the asked "
        "format and size is stored as it came.",
    ),
    SettingDoc("IMAGEGEN_JPEG_QUALITY", "90", "Quality (1-100) of JPEGs the service encodes."),
    SettingDoc("IMAGEGEN_WEBP_QUALITY", "90", "Quality (1-100) of WebPs the service encodes."),
    SettingDoc(
        "IMAGEGEN_WEBP_EFFORT",
        "4",
        "CPU effort (0-6) of WebP encoding; higher is smaller and slower.",
    ),
    SettingDoc("IMAGEGEN_WORKERS", "4", "Jobs one process runs at once."),
    SettingDoc(
        "IMAGEGEN_DB_POOL_SIZE",
        "16",
        "Most PostgreSQL connections one process opens (plus one for LISTEN); workers and "
        "RPCs share them. A process that would exceed the server's `max_connections` "
        "refuses to start.",
    ),
    SettingDoc("IMAGEGEN_LEASE", "30", "Seconds a worker's claim on a job lasts without renewal."),
    SettingDoc("IMAGEGEN_MAX_ATTEMPTS", "3", "Times a job is started before it is failed."),
    SettingDoc("IMAGEGEN_PRICING_FILE", "(built-in table)", "JSON price table in credits."),
    SettingDoc("IMAGEGEN_PLANS_FILE", "(built-in table)",
               "JSON plan limits: requests per hour and day, concurrent generations, open "
               "streams, storage, monthly credits, retention periods."),
    SettingDoc("IMAGEGEN_REQUEST_ID_TTL", "86400", "Seconds a request_id is remembered."),
    SettingDoc(
        "IMAGEGEN_MAX_BATCH",
        "50",
        f"Most specs one BatchGenerate request may hold (at most {MAX_BATCH}: a batch is "
        "accepted in one transaction).",
    ),
    SettingDoc(
        "IMAGEGEN_GC_INTERVAL",
        "300",
        "Seconds between retention passes (purges, event-log compaction, orphan sweep) in "
        "each replica, one replica at a time; 0 turns the reaper off (`imagegen gc` still "
        "runs a pass).",
    ),
    SettingDoc(
        "IMAGEGEN_GC_BATCH_SIZE",
        "500",
        "Rows a retention pass removes per transaction (and blob keys it checks per query).",
    ),
    SettingDoc(
        "IMAGEGEN_GC_ORPHAN_GRACE",
        "3600",
        "Seconds a blob that no image row names must be old before the orphan sweep "
        "deletes it (more than any store-to-commit delay).",
    ),
    SettingDoc(
        "IMAGEGEN_GC_SWEEP_INTERVAL",
        "86400",
        "Seconds between orphan sweeps (each lists every image blob), across replicas.",
    ),
    SettingDoc("IMAGEGEN_PROVIDER_TIMEOUT", "120", "Seconds one provider call may take."),
    SettingDoc(
        "IMAGEGEN_LOCAL_STEP_DELAY",
        "0.05",
        "Seconds the `local` renderer pauses between its progress steps.",
    ),
    SettingDoc("IMAGEGEN_LOG_LEVEL", "INFO", "Log level."),
    SettingDoc(
        "IMAGEGEN_MODERATION_CHAIN",
        "rules",
        "Comma-separated moderators asked in order before any cost: `rules` (local term "
        "lists), `openai` (OpenAI moderation endpoint); `none` turns moderation off.",
    ),
    SettingDoc(
        "IMAGEGEN_MODERATION_POLICY_FILE",
        "(built-in policy)",
        "JSON moderation policy per plan: block, flag or allow per category, score "
        "threshold, fail closed or open, suspension after N blocks in a window.",
    ),
    SettingDoc(
        "IMAGEGEN_MODERATION_RULES_FILE",
        "(built-in list)",
        "JSON term and pattern lists per category for the `rules` moderator; replaces "
        "the shipped list.",
    ),
    SettingDoc(
        "IMAGEGEN_MODERATION_URL",
        "(OPENAI_BASE_URL, only if the chain names openai and both moderation settings "
        "are unset)",
        "Base URL of the OpenAI moderation endpoint (`{url}/moderations`).",
    ),
    SettingDoc(
        "IMAGEGEN_MODERATION_API_KEY",
        "(OPENAI_API_KEY, on the same terms)",
        "Bearer key of the moderation endpoint; unset sends none.",
    ),
    SettingDoc(
        "IMAGEGEN_MODERATION_TIMEOUT",
        "5",
        "Seconds one call to the moderation endpoint may take before it counts as down.",
    ),
    SettingDoc(
        "IMAGEGEN_MODERATION_STORE_TEXT",
        "false",
        "Store the texts of blocked and flagged requests for review; otherwise only their "
        "SHA-256.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_KEY",
        "(development key in the data directory)",
        f"Key (at least {MIN_WEBHOOK_KEY_CHARS} characters) that encrypts users' webhook "
        "signing secrets in the database; replicas sharing a database need the same one.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_SECRET_GRACE",
        "86400",
        "Seconds a rotated webhook secret goes on signing beside the new one.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_TIMEOUT",
        "10",
        "Seconds one webhook attempt may take (connect, send, answer); past it the attempt "
        "failed.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_RETRY_DELAYS",
        DEFAULT_WEBHOOK_RETRY_DELAYS,
        "Comma-separated seconds between a failed webhook attempt and the next (the last "
        "repeats); the default spreads 11 attempts over about 24 hours.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_MAX_ATTEMPTS",
        "11",
        "Webhook attempts in all before a callback is given up.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_CONCURRENCY",
        "8",
        "Webhook attempts one process makes at once.",
    ),
    SettingDoc(
        "IMAGEGEN_WEBHOOK_POLL",
        "30",
        "Most seconds between one process's looks for due callbacks when nothing wakes it "
        "(a NOTIFY wakes it when one is queued; it wakes itself when a retry falls due).",
    ),
    SettingDoc("BUILT_IN_FORGE_API_URL", "(unset)", "Base URL of the Forge ImageService."),
    SettingDoc("BUILT_IN_FORGE_API_KEY", "(unset)", "Bearer key of the Forge ImageService."),
    SettingDoc(
        "IMAGEGEN_SDWEBUI_URL",
        "(unset)",
        "Base URL of an AUTOMATIC1111 / SD WebUI Forge server (the `sdwebui` provider).",
    ),
    SettingDoc(
        "IMAGEGEN_ENHANCE_URL",
        "(unset: the local enhancer)",
        "Base URL of an OpenAI-compatible chat-completions server for EnhancePrompt "
        "(e.g. `https://api.openai.com/v1`); needs IMAGEGEN_ENHANCE_MODEL.",
    ),
    SettingDoc(
        "IMAGEGEN_ENHANCE_API_KEY",
        "(unset: no Authorization header)",
        "Bearer key of the prompt enhancement model.",
    ),
    SettingDoc("IMAGEGEN_ENHANCE_MODEL", "(unset)", "Chat model that enhances prompts."),
    SettingDoc(
        "IMAGEGEN_ENHANCE_TIMEOUT", "30", "Seconds one call to the enhancement model may take."
    ),
    SettingDoc("OPENAI_API_KEY", "(unset)", "OpenAI Images key."),
    SettingDoc("OPENAI_BASE_URL", "(unset)", "OpenAI-compatible base URL."),
    SettingDoc(
        "OTEL_*",
        "(no export)",
        "Standard OpenTelemetry variables; OTLP export when an endpoint is set, over gRPC "
        "or `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`; no span is recorded otherwise.",
    ),
    SettingDoc("IMAGEGEN_ADDR", "127.0.0.1:50051", "CLI: server address."),
    SettingDoc("IMAGEGEN_TOKEN", "(minted from the data directory's key)", "CLI: bearer token."),
)


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


@dataclass(frozen=True)
class S3Settings:
    """Where S3 blobs go; credentials come from the standard AWS variables."""

    endpoint: str
    bucket: str
    region: str
    prefix: str


@dataclass(frozen=True)
class JwtSettings:
    """How bearer tokens are verified."""

    key: str | None
    algorithms: tuple[str, ...]
    issuer: str | None
    audience: str | None


@dataclass(frozen=True)
class ProvenanceSettings:
    """How images are marked: the C2PA signing chain and key (both or neither; PEM text or
    file paths, resolved by imagegen.provenance) and the usage notice."""

    cert: str | None
    key: str | None
    usage_notice: str


@dataclass(frozen=True)
class ForgeSettings:
    """The Forge ImageService; both values are needed for it to be usable."""

    url: str | None
    api_key: str | None


#: Moderators IMAGEGEN_MODERATION_CHAIN may name.
MODERATORS = ("rules", "openai")


@dataclass(frozen=True)
class ModerationSettings:
    """The moderator chain and its outside endpoint. `url` and `api_key` are the openai
    moderator's own settings, or OPENAI_BASE_URL/OPENAI_API_KEY when the chain names
    openai and neither of its own is set; they never configure the image provider."""

    chain: tuple[str, ...]
    policy_file: Path | None
    rules_file: Path | None
    url: str | None
    api_key: str | None
    timeout: timedelta
    store_text: bool


@dataclass(frozen=True)
class GcSettings:
    """The retention reaper: how often it runs (None: off), its batch size, and the orphan
    sweep's grace period and interval."""

    interval: timedelta | None
    batch_size: int
    orphan_grace: timedelta
    sweep_interval: timedelta


@dataclass(frozen=True)
class McpSettings:
    """The MCP face: its HTTP port (None: off) and how long job tools wait."""

    port: int | None
    default_wait: float
    max_wait: float


@dataclass(frozen=True)
class EnhanceModelSettings:
    """The prompt enhancement model; `url` unset means the local enhancer."""

    url: str | None
    api_key: str | None
    model: str | None
    timeout: timedelta


@dataclass(frozen=True)
class WebhookSettings:
    """Signed webhooks: the key that encrypts users' secrets (None: the development key
    in the data directory), a rotation's grace period, and how callbacks are sent."""

    key: str | None
    secret_grace: timedelta
    timeout: timedelta
    retry_delays: tuple[timedelta, ...]
    max_attempts: int
    concurrency: int
    poll_interval: float


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment."""

    data_dir: Path
    host: str
    grpc_port: int
    http_port: int
    mcp: McpSettings
    #: WaitGeneration's wait when a request names no timeout, and its ceiling
    wait_default: timedelta
    wait_max: timedelta
    public_url: str | None
    ready_file: Path | None
    database_url: str | None
    s3: S3Settings | None
    url_ttl: timedelta
    shutdown_grace: timedelta
    jwt: JwtSettings
    provenance: ProvenanceSettings
    default_provider: str | None
    fallback_providers: tuple[str, ...]
    fetch_allow_hosts: tuple[str, ...]
    max_pixels: int
    max_input_bytes: int
    malloc_mmap_threshold: int
    download_chunk_bytes: int
    png_compress_level: int
    jpeg_quality: int
    webp_quality: int
    webp_effort: int
    workers: int
    db_pool_size: int
    lease: timedelta
    max_attempts: int
    pricing_file: Path | None
    plans_file: Path | None
    request_id_ttl: timedelta
    #: most specs in one BatchGenerate request
    max_batch: int
    provider_timeout: timedelta
    local_step_delay: float
    log_level: str
    forge: ForgeSettings
    openai_api_key: str | None
    openai_base_url: str | None
    sdwebui_url: str | None
    moderation: ModerationSettings
    enhance: EnhanceModelSettings
    webhooks: WebhookSettings
    gc: GcSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and check every setting; raises ConfigError naming a bad one."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        data_dir = Path(reader.text("IMAGEGEN_DATA_DIR", "~/.local/share/imagegen")).expanduser()
        s3_endpoint = reader.optional("IMAGEGEN_S3_ENDPOINT")
        s3_bucket = reader.optional("IMAGEGEN_S3_BUCKET")
        s3 = None
        if s3_endpoint or s3_bucket:
            s3 = S3Settings(
                endpoint=s3_endpoint or "",
                bucket=s3_bucket or "imagegen",
                region=reader.text("IMAGEGEN_S3_REGION", "us-east-1"),
                prefix=reader.text("IMAGEGEN_S3_PREFIX", "").strip("/"),
            )
        url_ttl = reader.seconds("IMAGEGEN_URL_TTL", 900)
        if not timedelta(seconds=1) <= url_ttl <= MAX_URL_TTL:
            raise ConfigError("IMAGEGEN_URL_TTL must be between 1 and 604800 seconds")
        algorithms = tuple(
            a.strip()
            for a in reader.text("IMAGEGEN_JWT_ALGORITHMS", "HS256").split(",")
            if a.strip()
        )
        if not algorithms or any(a.lower() == "none" for a in algorithms):
            raise ConfigError("IMAGEGEN_JWT_ALGORITHMS must list real algorithms (not none)")
        c2pa_cert = reader.optional("IMAGEGEN_C2PA_CERT")
        c2pa_key = reader.optional("IMAGEGEN_C2PA_KEY")
        if (c2pa_cert is None) != (c2pa_key is None):
            # Half a configuration would silently fall back to the development CA.
            raise ConfigError("set both IMAGEGEN_C2PA_CERT and IMAGEGEN_C2PA_KEY, or neither")
        usage_notice = reader.text("IMAGEGEN_USAGE_NOTICE", DEFAULT_USAGE_NOTICE)
        if len(usage_notice) > MAX_USAGE_NOTICE_CHARS:
            raise ConfigError(
                f"IMAGEGEN_USAGE_NOTICE must be at most {MAX_USAGE_NOTICE_CHARS} characters"
            )
        mcp_port_text = reader.optional("IMAGEGEN_MCP_PORT")
        max_wait = reader.number("IMAGEGEN_MCP_MAX_WAIT", 55.0)
        default_wait = reader.number("IMAGEGEN_MCP_WAIT", min(30.0, max_wait))
        if default_wait > max_wait:
            raise ConfigError("IMAGEGEN_MCP_WAIT must not be above IMAGEGEN_MCP_MAX_WAIT")
        mcp = McpSettings(
            port=None if mcp_port_text is None else reader.port("IMAGEGEN_MCP_PORT", 0),
            default_wait=default_wait,
            max_wait=max_wait,
        )
        enhance = EnhanceModelSettings(
            url=reader.optional("IMAGEGEN_ENHANCE_URL"),
            api_key=reader.optional("IMAGEGEN_ENHANCE_API_KEY"),
            model=reader.optional("IMAGEGEN_ENHANCE_MODEL"),
            timeout=reader.seconds("IMAGEGEN_ENHANCE_TIMEOUT", 30),
        )
        if enhance.url and not enhance.model:
            raise ConfigError("IMAGEGEN_ENHANCE_URL needs IMAGEGEN_ENHANCE_MODEL (the chat model)")
        if enhance.timeout <= timedelta(0):
            raise ConfigError("IMAGEGEN_ENHANCE_TIMEOUT must be more than 0 seconds")
        wait_max = reader.seconds("IMAGEGEN_WAIT_MAX", 120)
        wait_default = reader.seconds("IMAGEGEN_WAIT_DEFAULT", min(30.0, wait_max.total_seconds()))
        if wait_default <= timedelta(0) or wait_default > wait_max:
            raise ConfigError(
                "IMAGEGEN_WAIT_DEFAULT must be above 0 and not above IMAGEGEN_WAIT_MAX"
            )
        settings = cls(
            data_dir=data_dir,
            host=reader.text("IMAGEGEN_HOST", "127.0.0.1"),
            grpc_port=reader.port("IMAGEGEN_GRPC_PORT", 50051),
            http_port=reader.port("IMAGEGEN_HTTP_PORT", 8088),
            mcp=mcp,
            wait_default=wait_default,
            wait_max=wait_max,
            public_url=reader.optional("IMAGEGEN_PUBLIC_URL"),
            ready_file=_path_or_none(reader.optional("IMAGEGEN_READY_FILE")),
            database_url=reader.optional("DATABASE_URL"),
            s3=s3,
            url_ttl=url_ttl,
            shutdown_grace=reader.seconds("IMAGEGEN_SHUTDOWN_GRACE", 30),
            jwt=JwtSettings(
                key=reader.optional("IMAGEGEN_JWT_KEY"),
                algorithms=algorithms,
                issuer=reader.optional("IMAGEGEN_JWT_ISSUER"),
                audience=reader.optional("IMAGEGEN_JWT_AUDIENCE"),
            ),
            provenance=ProvenanceSettings(
                cert=c2pa_cert, key=c2pa_key, usage_notice=usage_notice
            ),
            default_provider=reader.optional("IMAGEGEN_DEFAULT_PROVIDER"),
            fallback_providers=tuple(
                p.strip()
                for p in reader.text("IMAGEGEN_FALLBACK_PROVIDERS", "").split(",")
                if p.strip()
            ),
            fetch_allow_hosts=tuple(
                h.strip().lower()
                for h in reader.text("IMAGEGEN_FETCH_ALLOW_HOSTS", "").split(",")
                if h.strip()
            ),
            max_pixels=reader.integer("IMAGEGEN_MAX_PIXELS", 16_777_216, minimum=1),
            max_input_bytes=reader.integer("IMAGEGEN_MAX_INPUT_BYTES", 20 * 1024 * 1024, minimum=1),
            # At most glibc's own ceiling for the threshold (64-bit DEFAULT_MMAP_THRESHOLD_MAX).
            malloc_mmap_threshold=reader.integer(
                "IMAGEGEN_MALLOC_MMAP_THRESHOLD", 4 * 1024 * 1024, maximum=32 * 1024 * 1024
            ),
            download_chunk_bytes=min(
                reader.integer("IMAGEGEN_DOWNLOAD_CHUNK_BYTES", 1024 * 1024, minimum=1024),
                1024 * 1024,
            ),
            png_compress_level=reader.integer(
                "IMAGEGEN_PNG_COMPRESS_LEVEL", 6, minimum=0, maximum=9
            ),
            jpeg_quality=reader.integer("IMAGEGEN_JPEG_QUALITY", 90, minimum=1, maximum=100),
            webp_quality=reader.integer("IMAGEGEN_WEBP_QUALITY", 90, minimum=1, maximum=100),
            webp_effort=reader.integer("IMAGEGEN_WEBP_EFFORT", 4, minimum=0, maximum=6),
            workers=reader.integer("IMAGEGEN_WORKERS", 4, minimum=1),
            db_pool_size=reader.integer("IMAGEGEN_DB_POOL_SIZE", 16, minimum=2),
            lease=reader.seconds("IMAGEGEN_LEASE", 30),
            max_attempts=reader.integer("IMAGEGEN_MAX_ATTEMPTS", 3, minimum=1),
            pricing_file=_path_or_none(reader.optional("IMAGEGEN_PRICING_FILE")),
            plans_file=_path_or_none(reader.optional("IMAGEGEN_PLANS_FILE")),
            request_id_ttl=reader.seconds("IMAGEGEN_REQUEST_ID_TTL", 86400),
            max_batch=reader.integer("IMAGEGEN_MAX_BATCH", 50, minimum=1, maximum=MAX_BATCH),
            provider_timeout=reader.seconds("IMAGEGEN_PROVIDER_TIMEOUT", 120),
            local_step_delay=reader.number("IMAGEGEN_LOCAL_STEP_DELAY", 0.05),
            log_level=reader.text("IMAGEGEN_LOG_LEVEL", "INFO").upper(),
            forge=ForgeSettings(
                url=reader.optional("BUILT_IN_FORGE_API_URL"),
                api_key=reader.optional("BUILT_IN_FORGE_API_KEY"),
            ),
            openai_api_key=reader.optional("OPENAI_API_KEY"),
            openai_base_url=reader.optional("OPENAI_BASE_URL"),
            sdwebui_url=reader.optional("IMAGEGEN_SDWEBUI_URL"),
            moderation=_moderation_settings(reader),
            enhance=enhance,
            webhooks=_webhook_settings(reader),
            gc=_gc_settings(reader),
        )
        return settings

    @property
    def forge_configured(self) -> bool:
        return bool(self.forge.url and self.forge.api_key)

    @property
    def effective_default_provider(self) -> str:
        if self.default_provider:
            return self.default_provider
        return "forge" if self.forge_configured else "local"


def _moderation_settings(reader: _Reader) -> ModerationSettings:
    raw_chain = reader.text("IMAGEGEN_MODERATION_CHAIN", "rules").lower()
    chain = tuple(m.strip() for m in raw_chain.split(",") if m.strip())
    if chain == ("none",):
        chain = ()
    unknown = [m for m in chain if m not in MODERATORS]
    if unknown or len(set(chain)) != len(chain):
        raise ConfigError(
            "IMAGEGEN_MODERATION_CHAIN must list distinct moderators from "
            f"{', '.join(MODERATORS)} (or be none), not {raw_chain!r}"
        )
    url = reader.optional("IMAGEGEN_MODERATION_URL")
    api_key = reader.optional("IMAGEGEN_MODERATION_API_KEY")
    if "openai" in chain:
        if url is None and api_key is None:
            # The OpenAI settings stand in only as a pair, and only for a chain that
            # asks for openai: the image provider's key never goes to another host.
            url = reader.optional("OPENAI_BASE_URL")
            api_key = reader.optional("OPENAI_API_KEY")
        if url is None:
            raise ConfigError(
                "IMAGEGEN_MODERATION_CHAIN names openai but IMAGEGEN_MODERATION_URL is not "
                "set (nor, with no moderation key either, OPENAI_BASE_URL)"
            )
    store_text = reader.text("IMAGEGEN_MODERATION_STORE_TEXT", "false").lower()
    if store_text not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError("IMAGEGEN_MODERATION_STORE_TEXT must be true or false")
    timeout = reader.seconds("IMAGEGEN_MODERATION_TIMEOUT", 5)
    if timeout <= timedelta(0):
        raise ConfigError("IMAGEGEN_MODERATION_TIMEOUT must be above 0")
    return ModerationSettings(
        chain=chain,
        policy_file=_path_or_none(reader.optional("IMAGEGEN_MODERATION_POLICY_FILE")),
        rules_file=_path_or_none(reader.optional("IMAGEGEN_MODERATION_RULES_FILE")),
        url=url,
        api_key=api_key,
        timeout=timeout,
        store_text=store_text in ("true", "1", "yes"),
    )


def _webhook_settings(reader: _Reader) -> WebhookSettings:
    key = reader.optional("IMAGEGEN_WEBHOOK_KEY")
    if key is not None and len(key) < MIN_WEBHOOK_KEY_CHARS:
        raise ConfigError(
            f"IMAGEGEN_WEBHOOK_KEY must be at least {MIN_WEBHOOK_KEY_CHARS} characters"
        )
    raw_delays = reader.text("IMAGEGEN_WEBHOOK_RETRY_DELAYS", DEFAULT_WEBHOOK_RETRY_DELAYS)
    try:
        delays = tuple(float(d) for d in raw_delays.split(",") if d.strip())
    except ValueError:
        delays = ()
    if not delays or any(not 0 < d <= 7 * 86400 for d in delays):
        raise ConfigError(
            "IMAGEGEN_WEBHOOK_RETRY_DELAYS must be comma-separated seconds, each above 0 and "
            f"at most 604800, not {raw_delays!r}"
        )
    timeout = reader.seconds("IMAGEGEN_WEBHOOK_TIMEOUT", 10)
    if not timedelta(0) < timeout <= timedelta(minutes=5):
        raise ConfigError("IMAGEGEN_WEBHOOK_TIMEOUT must be above 0 and at most 300 seconds")
    poll = reader.number("IMAGEGEN_WEBHOOK_POLL", 30.0)
    if poll <= 0:
        raise ConfigError("IMAGEGEN_WEBHOOK_POLL must be above 0")
    return WebhookSettings(
        key=key,
        secret_grace=reader.seconds("IMAGEGEN_WEBHOOK_SECRET_GRACE", 86400),
        timeout=timeout,
        retry_delays=tuple(timedelta(seconds=d) for d in delays),
        max_attempts=reader.integer("IMAGEGEN_WEBHOOK_MAX_ATTEMPTS", 11, minimum=1),
        concurrency=reader.integer("IMAGEGEN_WEBHOOK_CONCURRENCY", 8, minimum=1),
        poll_interval=poll,
    )


def _gc_settings(reader: _Reader) -> GcSettings:
    interval = reader.seconds("IMAGEGEN_GC_INTERVAL", 300)
    grace = reader.seconds("IMAGEGEN_GC_ORPHAN_GRACE", 3600)
    sweep = reader.seconds("IMAGEGEN_GC_SWEEP_INTERVAL", 86400)
    if sweep <= timedelta(0):
        raise ConfigError("IMAGEGEN_GC_SWEEP_INTERVAL must be above 0")
    if grace < timedelta(minutes=1):
        # Shorter would race blobs whose rows are about to commit.
        raise ConfigError("IMAGEGEN_GC_ORPHAN_GRACE must be at least 60 seconds")
    return GcSettings(
        interval=interval if interval > timedelta(0) else None,
        batch_size=reader.integer("IMAGEGEN_GC_BATCH_SIZE", 500, minimum=1, maximum=10_000),
        orphan_grace=grace,
        sweep_interval=sweep,
    )


def _path_or_none(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def optional(self, name: str) -> str | None:
        value = self._env.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, not {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}")
        return value

    def integer(
        self, name: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, not {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be at most {maximum}")
        return value

    def port(self, name: str, default: int) -> int:
        value = self.integer(name, default)
        if value > 65535:
            raise ConfigError(f"{name} must be a port number (0-65535)")
        return value

    def seconds(self, name: str, default: float) -> timedelta:
        return timedelta(seconds=self.number(name, default))
