"""Usage reporting: the credit balance, records in pages, sums by provider, day and
source, CSV exports."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import available_timezones

from imagegen.domain import paging
from imagegen.domain.credits import Balance, balance_of
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Identity
from imagegen.domain.plans import PlanTable
from imagegen.domain.usage import UsageRow, UsageTotalsRow
from imagegen.repositories.credits import CreditLedger
from imagegen.repositories.usage import UnknownTimeZone, UsageQueries
from imagegen.storage.base import BlobStore

MAX_RANGE = timedelta(days=366)
EARLIEST = datetime.min.replace(tzinfo=UTC)
DEFAULT_RANGE = timedelta(days=30)
CHUNK_BYTES = 1024 * 1024
EXPORT_BATCH = 500

USAGE_COLUMNS = (
    "name",
    "generation",
    "attempt",
    "provider",
    "model",
    "source",
    "status",
    "image_count",
    "credits",
    "cost_cents",
    "error_code",
    "error_message",
    "request_time",
    "complete_time",
    # Added with prompt enhancements; last, so that readers by position keep working.
    "kind",
)
GENERATION_COLUMNS = (
    "name",
    "state",
    "provider",
    "model",
    "source",
    "prompt",
    "negative_prompt",
    "style",
    "width",
    "height",
    "count",
    "format",
    "seed",
    "credits",
    "attempts",
    "error_code",
    "error_message",
    "request_id",
    "images",
    "image_urls",
    "create_time",
    "start_time",
    "end_time",
)


@dataclass(frozen=True)
class CreditBalance:
    """The caller's credits: the ledger's balance, and their plan's monthly allowance."""

    balance: Balance
    plan: str
    monthly_allowance: int


@dataclass(frozen=True)
class UsageStats:
    start: datetime
    end: datetime
    totals: UsageTotalsRow
    by_provider: list[UsageTotalsRow]
    by_day: list[UsageTotalsRow]
    by_source: list[UsageTotalsRow]


def time_range(
    start: datetime | None, end: datetime | None, *, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """[start, end) with defaults (the last 30 days); IMG_003 past 366 days or reversed."""
    end = end or (now or datetime.now(UTC))
    if start is None:
        # 30 days before an end in the first days of year 1 is not a datetime; the
        # range then starts at the first instant there is.
        start = end - DEFAULT_RANGE if end - EARLIEST > DEFAULT_RANGE else EARLIEST
    if end <= start:
        raise InvalidRequest("the end of the time range must be after its start", field="end_time")
    if end - start > MAX_RANGE:
        raise InvalidRequest("a time range may span at most 366 days", field="start_time")
    return start, end


@cache
def _time_zone_names() -> frozenset[str]:
    # IANA names only: ZoneInfo also opens files such as "localtime", "posixrules" or
    # "posix/Europe/Paris", which PostgreSQL refuses in AT TIME ZONE; "localtime" is
    # even listed as available where the system keeps it as a zone file.
    return (frozenset(available_timezones()) - {"localtime"}) | {"UTC"}


def _time(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


class UsageService:
    """The caller's usage records and what they add up to."""

    def __init__(
        self,
        queries: UsageQueries,
        ledger: CreditLedger,
        plans: PlanTable,
        blobs: BlobStore | None = None,
        url_ttl: timedelta | None = None,
    ) -> None:
        self._queries = queries
        self._ledger = ledger
        self._plans = plans
        self._blobs = blobs
        self._url_ttl = url_ttl or timedelta(minutes=15)

    async def balance(self, identity: Identity) -> CreditBalance:
        """The caller's balance by bucket, what their running jobs hold, and the monthly
        allowance of their plan. Nothing is written: a period not opened yet (a new
        user's first, or a new month's) is shown as its opening will make it."""
        monthly_allowance = self._plans.limits_for(identity.plan).monthly_credits
        facts, held = await self._ledger.balance_facts(identity.user_id)
        return CreditBalance(
            balance=balance_of(facts, held, monthly_allowance, datetime.now(UTC)),
            plan=identity.plan,
            monthly_allowance=monthly_allowance,
        )

    async def list_usage(
        self,
        identity: Identity,
        *,
        statuses: tuple[str, ...],
        start: datetime | None,
        end: datetime | None,
        page_size: int,
        page_token: str,
    ) -> tuple[list[UsageRow], str]:
        size = paging.page_size(page_size)
        if start and end and end <= start:
            raise InvalidRequest(
                "the end of the time range must be after its start", field="request_time_end"
            )
        scope = f"{sorted(statuses)}|{start}|{end}"
        cursor = paging.decode_cursor(page_token, scope)
        page = await self._queries.list_for_user(
            identity.user_id,
            statuses=statuses,
            start=start,
            end=end,
            after=(cursor.created_at, cursor.id) if cursor else None,
            limit=size + 1,
        )
        token = ""
        if len(page) > size:
            page = page[:size]
            token = paging.encode_cursor(paging.Cursor(page[-1].requested_at, page[-1].id), scope)
        return page, token

    async def stats(
        self, identity: Identity, start: datetime | None, end: datetime | None, time_zone: str
    ) -> UsageStats:
        start, end = time_range(start, end)
        zone = time_zone or "UTC"
        if zone not in _time_zone_names():
            raise InvalidRequest(
                f"time zone {zone!r} is not known; use an IANA name such as Europe/Paris",
                field="time_zone",
            )
        try:
            totals, by_provider, by_day, by_source = await self._queries.totals(
                identity.user_id, start, end, zone
            )
        except UnknownTimeZone:
            raise InvalidRequest(
                f"time zone {zone!r} is not known to the database; use an IANA name such as "
                "Europe/Paris",
                field="time_zone",
            ) from None
        return UsageStats(start, end, totals, by_provider, by_day, by_source)

    async def export_usage(
        self,
        identity: Identity,
        start: datetime | None,
        end: datetime | None,
        statuses: tuple[str, ...],
    ) -> AsyncIterator[bytes]:
        """CSV of the caller's usage records, oldest first, header row first."""
        start, end = time_range(start, end)

        async def rows() -> AsyncIterator[list[object]]:
            after: tuple[datetime, str] | None = None
            while True:
                batch = await self._queries.list_for_user(
                    identity.user_id,
                    statuses=statuses,
                    start=start,
                    end=end,
                    after=after,
                    limit=EXPORT_BATCH,
                    newest_first=False,
                )
                for r in batch:
                    yield [
                        f"usage/{r.id}",
                        f"generations/{r.generation_id}" if r.generation_id else "",
                        r.attempt,
                        r.provider,
                        r.model,
                        r.source,
                        r.status,
                        r.image_count,
                        r.credits,
                        "" if r.cost_cents is None else r.cost_cents,
                        r.error_code,
                        r.error_message,
                        _time(r.requested_at),
                        _time(r.completed_at),
                        r.kind.value,
                    ]
                if len(batch) < EXPORT_BATCH:
                    return
                after = (batch[-1].requested_at, batch[-1].id)

        async for chunk in _csv_chunks(USAGE_COLUMNS, rows()):
            yield chunk

    async def export_generations(
        self,
        identity: Identity,
        start: datetime | None,
        end: datetime | None,
        states: tuple[str, ...],
    ) -> AsyncIterator[bytes]:
        """CSV of the caller's generation history, oldest first, header row first."""
        start, end = time_range(start, end)

        async def rows() -> AsyncIterator[list[object]]:
            after: tuple[datetime, str] | None = None
            while True:
                batch = await self._queries.generations_for_export(
                    identity.user_id,
                    states=states,
                    start=start,
                    end=end,
                    after=after,
                    limit=EXPORT_BATCH,
                )
                for g in batch:
                    urls = []
                    if self._blobs is not None:
                        urls = [
                            await self._blobs.signed_url(key, self._url_ttl)
                            for key in g["image_keys"]
                        ]
                    yield [
                        f"generations/{g['id']}",
                        g["state"],
                        g["provider"],
                        g["model"],
                        g["source"],
                        g["prompt"],
                        g["negative_prompt"],
                        g["style"],
                        g["width"],
                        g["height"],
                        g["image_count"],
                        g["output_format"],
                        "" if g["seed"] is None else g["seed"],
                        g["credits"],
                        g["attempts"],
                        g["error_code"],
                        g["error_message"],
                        g["request_id"] or "",
                        " ".join(f"images/{i}" for i in g["image_ids"]),
                        " ".join(urls),
                        _time(g["created_at"]),
                        _time(g["started_at"]),
                        _time(g["completed_at"]),
                    ]
                if len(batch) < EXPORT_BATCH:
                    return
                after = (batch[-1]["created_at"], str(batch[-1]["id"]))

        async for chunk in _csv_chunks(GENERATION_COLUMNS, rows()):
            yield chunk


#: What a spreadsheet takes as the start of a formula (OWASP, "CSV Injection").
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_cell(value: object) -> object:
    """A text cell that a spreadsheet would run as a formula (`=HYPERLINK(...)` in a
    prompt) gets a leading single quote, as OWASP recommends; numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_TRIGGERS):
        return "'" + value
    return value


async def _csv_chunks(
    header: Iterable[str], rows: AsyncIterator[list[object]]
) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(header)
    async for row in rows:
        writer.writerow([neutralise_cell(cell) for cell in row])
        # Counted in characters: even at 4 bytes each a chunk stays under 1 MiB.
        if buffer.tell() >= CHUNK_BYTES // 8:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    if buffer.tell():
        yield buffer.getvalue().encode()
