"""`imagegen moderation list|show|user|unsuspend`: review moderation decisions and abuse
counters straight from the database (an operator's tool, like `imagegen credits`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from imagegen.config import Settings
from imagegen.domain.moderation import Decision
from imagegen.repositories.moderation import DecisionRecord, ModerationRepository, UserAbuseState

_RELATIVE = re.compile(r"^(?P<amount>\d+(?:\.\d+)?)(?P<unit>[smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def add_parser(sub: Any) -> None:
    """The `moderation` command and its actions."""
    group = sub.add_parser(
        "moderation", help="review moderation decisions and suspensions (talks to the database)"
    )
    actions = group.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="decisions, newest first (blocked and flagged unless --decision says)"
    )
    stored = [d.value for d in Decision if d is not Decision.UNAVAILABLE]
    listing.add_argument("--decision", choices=stored)
    listing.add_argument("--user", help="only this user's decisions")
    listing.add_argument(
        "--since", help="from this time on: ISO 8601, or an age such as 30m, 12h, 7d"
    )
    listing.add_argument("--limit", type=int, default=50, help="most rows to print (1-1000)")
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    show = actions.add_parser("show", help="one decision, with its user's counters")
    show.add_argument("id", help="decision id (from list)")
    show.add_argument("--json", action="store_true", help="print JSON")
    user = actions.add_parser("user", help="a user's abuse counters and suspension")
    user.add_argument("user_id")
    user.add_argument("--json", action="store_true", help="print JSON")
    lift = actions.add_parser("unsuspend", help="end a user's suspension now")
    lift.add_argument("user_id")


def parse_since(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC when it names no zone) or an age before `now` ("30m")."""
    match = _RELATIVE.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match["unit"]]: float(match["amount"])})
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run one `moderation` action; returns the exit code."""
    if args.action == "list" and not 1 <= args.limit <= 1000:
        print("imagegen: --limit must be between 1 and 1000", file=sys.stderr)
        return 2
    since = None
    if getattr(args, "since", None):
        try:
            since = parse_since(args.since, datetime.now(UTC))
        except ValueError:
            print(
                f"imagegen: --since {args.since!r} is neither ISO 8601 nor like 30m, 12h, 7d",
                file=sys.stderr,
            )
            return 2
    actions: dict[str, Callable[[ModerationRepository], Awaitable[int]]] = {
        "list": lambda repo: _list(repo, args, since),
        "show": lambda repo: _show(repo, args),
        "user": lambda repo: _user(repo, args),
        "unsuspend": lambda repo: _unsuspend(repo, args),
    }
    return asyncio.run(_with_repository(settings, actions[args.action]))


async def _with_repository(
    settings: Settings, action: Callable[[ModerationRepository], Awaitable[int]]
) -> int:
    import asyncpg

    from imagegen.embedded import start_embedded_postgres
    from imagegen.repositories.db import open_pool

    embedded = None
    dsn = settings.database_url
    if dsn is None:
        embedded = await start_embedded_postgres(settings.data_dir)
        dsn = embedded.dsn
    try:
        pool = await open_pool(dsn, max_size=2)
        try:
            return await action(ModerationRepository(pool))
        except asyncpg.UndefinedTableError:
            print("imagegen: no moderation tables yet; run `imagegen migrate`", file=sys.stderr)
            return 1
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            await embedded.stop()


async def _list(
    repo: ModerationRepository, args: argparse.Namespace, since: datetime | None
) -> int:
    records = await repo.list_decisions(
        decision=Decision(args.decision) if args.decision else None,
        user_id=args.user,
        since=since,
        limit=args.limit,
    )
    if args.json:
        for record in records:
            print(json.dumps(_record_json(record)))
        return 0
    print(f"{'ID':36}  {'TIME (UTC)':19}  {'DECISION':8}  {'PURPOSE':15}  USER  CATEGORIES")
    for record in records:
        stamp = record.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        categories = ",".join(record.categories) or "-"
        user = record.user_id + (f" ({record.sub_account})" if record.sub_account else "")
        print(
            f"{record.id:36}  {stamp:19}  {record.decision.value:8}  "
            f"{record.purpose.value:15}  {user}  {categories}"
        )
    print(f"{len(records)} decision(s)", file=sys.stderr)
    return 0


async def _show(repo: ModerationRepository, args: argparse.Namespace) -> int:
    record = await repo.get(args.id)
    if record is None:
        print(f"imagegen: no moderation decision {args.id!r}", file=sys.stderr)
        return 1
    state = await repo.user_state(record.user_id)
    if args.json:
        print(json.dumps({**_record_json(record), "user": _state_json(state)}, indent=2))
        return 0
    lines = [
        f"decision     {record.decision.value}",
        f"id           {record.id}",
        f"time         {record.created_at.astimezone(UTC).isoformat(timespec='seconds')}",
        f"user         {record.user_id}",
        f"sub-account  {record.sub_account or '-'}",
        f"plan         {record.plan or '-'}",
        f"purpose      {record.purpose.value}",
        f"categories   {', '.join(record.categories) or '-'}",
        f"moderators   {record.moderators or '-'}",
    ]
    if record.unavailable:
        lines.append(f"unavailable  {', '.join(record.unavailable)} (the policy failed open)")
    if record.generation_id:
        lines.append(f"generation   generations/{record.generation_id}")
    if record.scores:
        top = sorted(record.scores.items(), key=lambda item: -item[1])
        lines.append("scores       " + ", ".join(f"{name} {score:.3f}" for name, score in top))
    for field, digest in record.text_sha256.items():
        lines.append(f"sha256       {field}: {digest}")
    if record.texts is None:
        lines.append("texts        not stored (IMAGEGEN_MODERATION_STORE_TEXT is off, or allowed)")
    else:
        for field, text in record.texts.items():
            lines.append(f"text         {field}: {text}")
    lines.extend(_state_lines(state))
    print("\n".join(lines))
    return 0


async def _user(repo: ModerationRepository, args: argparse.Namespace) -> int:
    state = await repo.user_state(args.user_id)
    if args.json:
        print(json.dumps(_state_json(state), indent=2))
        return 0
    print("\n".join(_state_lines(state) or [f"{args.user_id}: nothing recorded"]))
    return 0


async def _unsuspend(repo: ModerationRepository, args: argparse.Namespace) -> int:
    if await repo.lift_suspension(args.user_id):
        print(f"{args.user_id}: suspension lifted")
        return 0
    print(f"{args.user_id}: not suspended", file=sys.stderr)
    return 1


def _state_lines(state: UserAbuseState | None) -> list[str]:
    if state is None:
        return []
    now = datetime.now(UTC)
    until = state.suspended_until
    suspended = (
        f"until {until.astimezone(UTC).isoformat(timespec='seconds')}"
        if until is not None and until > now
        else "no"
    )
    return [
        f"user {state.user_id}: blocked {state.blocked_total}, flagged {state.flagged_total}, "
        f"failed generations {state.failed_generations}, suspensions {state.suspensions}",
        f"suspended    {suspended}",
    ]


def _record_json(record: DecisionRecord) -> dict[str, Any]:
    data = asdict(record)
    data["purpose"] = record.purpose.value
    data["decision"] = record.decision.value
    data["categories"] = list(record.categories)
    data["unavailable"] = list(record.unavailable)
    data["created_at"] = record.created_at.isoformat()
    return data


def _state_json(state: UserAbuseState | None) -> dict[str, Any] | None:
    if state is None:
        return None
    data = asdict(state)
    for key in ("last_blocked_at", "last_failed_at", "suspended_until"):
        value = data[key]
        data[key] = value.isoformat() if value is not None else None
    return data
