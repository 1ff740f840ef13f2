"""`imagegen`: serve, migrate, check health, mint a token, generate (one prompt, or a
file of them as a batch), outpaint, upscale, get help with prompts, review moderation,
read a webhook secret, run a retention pass, or serve MCP from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from datetime import timedelta

from imagegen.config import ConfigError, Settings
from imagegen.domain.models import Style

PLANS = ("free", "basic", "pro", "enterprise")
STYLES = tuple(style.value for style in Style)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="serve gRPC (and signed URLs, /metrics over HTTP)")
    sub.add_parser("migrate", help="apply database migrations and exit")

    health = sub.add_parser(
        "health",
        help="exit 0 if the server's gRPC health says SERVING, else 1 (the image's HEALTHCHECK)",
    )
    health.add_argument(
        "--addr",
        default=None,
        help="server address (default: this machine's IMAGEGEN_HOST:IMAGEGEN_GRPC_PORT, "
        "loopback when the host is 0.0.0.0)",
    )
    health.add_argument(
        "--service", default="", help='grpc.health.v1 service name ("" is the whole server)'
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")

    token = sub.add_parser("token", help="mint a development token (printed on the last line)")
    token.add_argument("--user", required=True, help="user id (the `sub` claim)")
    token.add_argument("--plan", default="free", choices=PLANS)
    token.add_argument("--sub-account", default="", help="sub-account (team) id")
    token.add_argument("--hours", type=float, default=24.0, help="lifetime in hours")
    token.add_argument(
        "--create-key",
        action="store_true",
        help="make a development signing key in IMAGEGEN_DATA_DIR if there is none "
        "(by default the server's key must exist: tokens signed with another key are refused)",
    )

    gen = sub.add_parser("generate", help="generate images and save them")
    gen.add_argument("prompt")
    gen.add_argument("--style", choices=STYLES)
    gen.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, e.g. 512x512")
    gen.add_argument("--format", default="png", choices=("png", "jpeg", "webp"))
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--count", type=int, default=1)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--provider", default="")
    gen.add_argument("--out", default=".", help="directory to save the images in")
    gen.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")
    gen.add_argument("--user", default="cli", help="user for a minted token when none is given")

    from imagegen.cli_enlarge import add_parsers as add_enlarge_parsers

    add_enlarge_parsers(sub, STYLES)

    mcp = sub.add_parser(
        "mcp",
        help="serve MCP on stdin/stdout for a local agent, calling a served imagegen "
        "(IMAGEGEN_ADDR) with IMAGEGEN_TOKEN",
    )
    mcp.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")
    mcp.add_argument("--user", default="cli", help="user for a minted token when none is given")

    tools = sub.add_parser(
        "tools", help="print the MCP tools' definitions as JSON, for frameworks without MCP"
    )
    tools.add_argument(
        "--format",
        default="mcp",
        choices=("openai", "mcp"),
        help="openai: function-calling `tools`; mcp: MCP Tool objects (with output schemas)",
    )

    suggest = sub.add_parser(
        "suggest", help="complete a prompt from your prompts, templates and built-in phrases"
    )
    suggest.add_argument("text", help="what you have typed so far (may be empty)")
    suggest.add_argument("--style", choices=STYLES)
    suggest.add_argument("--limit", type=int, default=0, help="1 to 50 (default: 10)")
    enhance = sub.add_parser(
        "enhance", help="rewrite a prompt with lighting, composition and quality details"
    )
    enhance.add_argument("prompt")
    enhance.add_argument("--style", choices=STYLES)
    for prompt_command in (suggest, enhance):
        prompt_command.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")
        prompt_command.add_argument(
            "--user", default="cli", help="user for a minted token when none is given"
        )

    provenance = sub.add_parser(
        "provenance",
        help="print an image's C2PA manifest and XMP marks (exit 1 if none or invalid)",
    )
    provenance.add_argument("file", help="PNG, JPEG or WebP file")
    provenance.add_argument(
        "--anchors",
        help="PEM file of trusted roots (default: the development CA in the data directory)",
    )
    provenance.add_argument("--json", action="store_true", help="print JSON")

    credits = sub.add_parser("credits", help="administer credits (talks to the database)")
    credit_actions = credits.add_subparsers(dest="action", required=True)
    grant = credit_actions.add_parser("grant", help="grant credits that never expire")
    grant.add_argument("--user", required=True)
    grant.add_argument("--amount", type=int, required=True)
    grant.add_argument("--note", default="granted by an administrator")

    from imagegen.cli_batch import add_parser as add_batch_parser
    from imagegen.cli_moderation import add_parser as add_moderation_parser
    from imagegen.cli_webhook import add_parser as add_webhook_parser

    add_batch_parser(sub)
    add_moderation_parser(sub)
    add_webhook_parser(sub)

    from imagegen.cli_gc import add_parser as add_gc_parser

    add_gc_parser(sub)

    for what, help_text in (
        ("usage", "usage records"),
        ("generations", "generation history"),
    ):
        group = sub.add_parser(what, help=f"{help_text} reports")
        actions = group.add_subparsers(dest="action", required=True)
        export = actions.add_parser("export", help=f"export {help_text} as CSV")
        export.add_argument("--start", help="start time, ISO 8601 (default: 30 days ago)")
        export.add_argument("--end", help="end time, ISO 8601 (default: now)")
        export.add_argument("--out", default="-", help="file to write (default: stdout)")
        export.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")
        export.add_argument(
            "--user",
            default="cli",
            help="whose rows to export (default: cli, the user `imagegen generate` calls as); "
            "ignored when IMAGEGEN_TOKEN is set: its user's rows are exported",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        # Docker reserves a HEALTHCHECK's exit code 2; unhealthy is 1.
        return 1 if args.command == "health" else 2
    if args.command == "serve":
        return _serve(settings)
    if args.command == "migrate":
        return _migrate(settings)
    if args.command == "health":
        return _health(settings, args)
    if args.command == "token":
        return _token(settings, args)
    if args.command == "generate":
        from imagegen.cli_generate import run_generate

        return asyncio.run(run_generate(settings, args))
    if args.command in ("outpaint", "upscale"):
        from imagegen.cli_enlarge import run_outpaint, run_upscale

        enlarge = run_outpaint if args.command == "outpaint" else run_upscale
        return asyncio.run(enlarge(settings, args))
    if args.command == "batch":
        from imagegen.cli_batch import run_batch

        return asyncio.run(run_batch(settings, args))
    if args.command in ("suggest", "enhance"):
        from imagegen.cli_prompts import run_enhance, run_suggest

        run = run_suggest if args.command == "suggest" else run_enhance
        return asyncio.run(run(settings, args))
    if args.command == "credits":
        return _grant(settings, args)
    if args.command == "provenance":
        return _provenance(settings, args)
    if args.command == "mcp":
        return _mcp(settings, args)
    if args.command == "tools":
        return _tools(args)
    if args.command == "moderation":
        from imagegen.cli_moderation import run as run_moderation

        return run_moderation(settings, args)
    if args.command == "webhook":
        from imagegen.cli_webhook import run as run_webhook

        return asyncio.run(run_webhook(settings, args))
    if args.command == "gc":
        from imagegen.cli_gc import run_gc

        return asyncio.run(run_gc(settings, args))
    if args.command in ("usage", "generations"):
        from imagegen.cli_export import run_export

        return asyncio.run(run_export(settings, args, args.command))
    return 2  # pragma: no cover - argparse rejects other commands


def _mcp(settings: Settings, args: argparse.Namespace) -> int:
    from imagegen.cli_generate import _token, address_of
    from imagegen.mcp import run_stdio
    from imagegen.mcp.tools import McpOptions
    from imagegen.telemetry import configure_logging

    # stdout carries the protocol: logs go to stderr only (configure_logging's stream).
    configure_logging(settings.log_level)
    address = address_of(settings, args)
    options = McpOptions(default_wait=settings.mcp.default_wait, max_wait=settings.mcp.max_wait)
    asyncio.run(run_stdio(address, _token(settings, args.user), options))
    return 0


def _tools(args: argparse.Namespace) -> int:
    import json

    from imagegen.mcp.definitions import mcp_tool_definitions, openai_tool_definitions

    definitions = openai_tool_definitions() if args.format == "openai" else mcp_tool_definitions()
    print(json.dumps(definitions, indent=2, ensure_ascii=False))
    return 0


def _serve(settings: Settings) -> int:
    from imagegen.ports import PortUnavailable, ensure_ports_free
    from imagegen.server import Server
    from imagegen.telemetry import configure_logging

    try:
        ensure_ports_free(settings)
    except PortUnavailable as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level)
    if settings.database_url is None:
        print(
            f"imagegen: using embedded PostgreSQL and local blobs in {settings.data_dir}",
            file=sys.stderr,
        )
    if settings.jwt.key is None:
        print(
            "imagegen: development JWT key in the data directory; "
            "get a token with: imagegen token --user alice",
            file=sys.stderr,
        )
    try:
        asyncio.run(Server(settings).run())
    except PortUnavailable as exc:
        # Taken between the check above and the bind; what had started is stopped.
        print(f"imagegen: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        # A setting that only the database can judge (the pool size against its
        # max_connections); what had started is stopped.
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


def _migrate(settings: Settings) -> int:
    from imagegen.embedded import start_embedded_postgres
    from imagegen.repositories.migrator import apply_migrations

    async def _run() -> list[str]:
        if settings.database_url is not None:
            return await apply_migrations(settings.database_url)
        embedded = await start_embedded_postgres(settings.data_dir)
        try:
            return await apply_migrations(embedded.dsn)
        finally:
            await embedded.stop()

    applied = asyncio.run(_run())
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def _health(settings: Settings, args: argparse.Namespace) -> int:
    from imagegen.healthcheck import check_health, local_address

    # Not IMAGEGEN_ADDR: a health check asks about the server beside it, the one these
    # same settings configure, never a remote one a CLI user points at.
    address = args.addr or local_address(settings.host, settings.grpc_port)
    answer = check_health(address, args.service, timeout=args.timeout)
    print(answer.detail, file=sys.stdout if answer.serving else sys.stderr)
    return 0 if answer.serving else 1


def _grant(settings: Settings, args: argparse.Namespace) -> int:
    from imagegen.embedded import start_embedded_postgres
    from imagegen.repositories.credits import CreditLedger
    from imagegen.repositories.db import open_pool

    if args.amount <= 0:
        print("imagegen: --amount must be positive", file=sys.stderr)
        return 2

    async def _run() -> int:
        embedded = None
        dsn = settings.database_url
        if dsn is None:
            embedded = await start_embedded_postgres(settings.data_dir)
            dsn = embedded.dsn
        pool = await open_pool(dsn, max_size=2)
        try:
            return await CreditLedger(pool).grant(args.user, args.amount, args.note)
        finally:
            await pool.close()
            if embedded is not None:
                await embedded.stop()

    balance = asyncio.run(_run())
    print(f"granted {args.amount} credits to {args.user}; balance {balance}")
    return 0


def _provenance(settings: Settings, args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from imagegen.provenance import DEV_CA_FILE, format_report, read_marks

    anchors_path = Path(args.anchors) if args.anchors else settings.data_dir / DEV_CA_FILE
    try:
        data = Path(args.file).read_bytes()
        anchors = anchors_path.read_text() if args.anchors or anchors_path.exists() else None
        report = read_marks(data, trust_anchors_pem=anchors)
    except (OSError, ValueError) as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.validation_state in ("Trusted", "Valid") else 1


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from imagegen.identity import NoSigningKey, mint_token, resolve_jwt_key

    try:
        key = resolve_jwt_key(settings.jwt, settings.data_dir, create=args.create_key)
    except NoSigningKey as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        return 2
    token = mint_token(
        key,
        user_id=args.user,
        plan=args.plan,
        sub_account=args.sub_account,
        lifetime=timedelta(hours=args.hours),
        algorithm=settings.jwt.algorithms[0],
        issuer=settings.jwt.issuer,
        audience=settings.jwt.audience,
    )
    print(token)
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    raise SystemExit(main())
