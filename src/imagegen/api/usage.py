"""UsageService: thin proto <-> domain mapping around the usage reports."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from imagegen.api import convert
from imagegen.api.context import identity
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import GenerationSource
from imagegen.domain.usage import UsageKind, UsageRow, UsageTotalsRow
from imagegen.services.usage import UsageService
from imagegen.v1 import common_pb2, usage_pb2, usage_pb2_grpc

Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
U = usage_pb2
_STATUS = {
    U.USAGE_STATUS_SUCCEEDED: "succeeded",
    U.USAGE_STATUS_FAILED: "failed",
    U.USAGE_STATUS_CANCELLED: "cancelled",
}
_STATUS_PB = {v: k for k, v in _STATUS.items()}
_KIND_PB = {
    UsageKind.GENERATION: U.USAGE_KIND_GENERATION,
    UsageKind.PROMPT_ENHANCEMENT: U.USAGE_KIND_PROMPT_ENHANCEMENT,
}
_SOURCE_PB = {
    GenerationSource.API.value: common_pb2.GENERATION_SOURCE_API,
    GenerationSource.UI.value: common_pb2.GENERATION_SOURCE_UI,
    GenerationSource.WORKFLOW.value: common_pb2.GENERATION_SOURCE_WORKFLOW,
    GenerationSource.AGENT.value: common_pb2.GENERATION_SOURCE_AGENT,
}


def _statuses(values: Any, field: str) -> tuple[str, ...]:
    out = []
    for value in values:
        if value not in _STATUS:
            raise InvalidRequest(f"status {value} is not a usage status", field=field)
        out.append(_STATUS[value])
    return tuple(out)


def _stamp(value: Any) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _record(r: UsageRow) -> usage_pb2.UsageRecord:
    message = U.UsageRecord(
        name=f"usage/{r.id}",
        generation=f"generations/{r.generation_id}" if r.generation_id else "",
        attempt=r.attempt,
        provider=r.provider,
        model=r.model,
        source=_SOURCE_PB.get(r.source, common_pb2.GENERATION_SOURCE_API),
        status=_STATUS_PB[r.status],
        image_count=r.image_count,
        credits=r.credits,
        error_code=r.error_code,
        error_message=r.error_message,
        request_time=_stamp(r.requested_at),
        complete_time=_stamp(r.completed_at),
        kind=_KIND_PB[r.kind],
    )
    if r.cost_cents is not None:
        message.cost_cents = r.cost_cents
    return message


def _totals(t: UsageTotalsRow) -> usage_pb2.UsageTotals:
    average = Duration()
    average.FromNanoseconds(int(t.average_seconds * 1e9))
    return U.UsageTotals(
        requests=t.requests,
        succeeded=t.succeeded,
        failed=t.failed,
        cancelled=t.cancelled,
        image_count=t.image_count,
        credits=t.credits,
        cost_cents=t.cost_cents,
        success_rate=t.succeeded / t.requests if t.requests else 0.0,
        average_generation_duration=average,
    )


class UsageServicer(usage_pb2_grpc.UsageServiceServicer):
    """gRPC face of usage reporting and the credit balance."""

    def __init__(self, service: UsageService) -> None:
        self._service = service

    async def GetCreditBalance(
        self, request: U.GetCreditBalanceRequest, context: Ctx
    ) -> U.GetCreditBalanceResponse:
        credits = await self._service.balance(identity())
        balance = credits.balance
        return U.GetCreditBalanceResponse(
            balance=U.CreditBalance(
                available_credits=balance.available,
                reserved_credits=balance.reserved,
                monthly_allowance_credits=credits.monthly_allowance,
                allowance_remaining_credits=balance.allowance_remaining,
                purchased_credits=balance.purchased,
                plan=credits.plan,
                period_start_time=_stamp(balance.period_start),
                period_reset_time=_stamp(balance.period_reset),
            )
        )

    async def ListUsage(self, request: U.ListUsageRequest, context: Ctx) -> U.ListUsageResponse:
        page, token = await self._service.list_usage(
            identity(),
            statuses=_statuses(request.statuses, "statuses"),
            start=convert.optional_time(request, "request_time_start"),
            end=convert.optional_time(request, "request_time_end"),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return U.ListUsageResponse(usage_records=[_record(r) for r in page], next_page_token=token)

    async def GetUsageStats(
        self, request: U.GetUsageStatsRequest, context: Ctx
    ) -> U.GetUsageStatsResponse:
        stats = await self._service.stats(
            identity(),
            convert.optional_time(request, "start_time"),
            convert.optional_time(request, "end_time"),
            request.time_zone,
        )
        return U.GetUsageStatsResponse(
            start_time=_stamp(stats.start),
            end_time=_stamp(stats.end),
            totals=_totals(stats.totals),
            by_provider=[
                U.ProviderUsage(provider=t.key, totals=_totals(t)) for t in stats.by_provider
            ],
            by_day=[U.DailyUsage(date=t.key, totals=_totals(t)) for t in stats.by_day],
            by_source=[
                U.SourceUsage(
                    source=_SOURCE_PB.get(t.key, common_pb2.GENERATION_SOURCE_API),
                    totals=_totals(t),
                )
                for t in stats.by_source
            ],
        )

    async def ExportUsage(
        self, request: U.ExportUsageRequest, context: Ctx
    ) -> AsyncIterator[U.ExportUsageResponse]:
        chunks = self._service.export_usage(
            identity(),
            convert.optional_time(request, "start_time"),
            convert.optional_time(request, "end_time"),
            _statuses(request.statuses, "statuses"),
        )
        async for chunk in chunks:
            yield U.ExportUsageResponse(data=chunk)

    async def ExportGenerations(
        self, request: U.ExportGenerationsRequest, context: Ctx
    ) -> AsyncIterator[U.ExportGenerationsResponse]:
        states = tuple(convert.state_from_proto(s).value for s in request.states)
        chunks = self._service.export_generations(
            identity(),
            convert.optional_time(request, "start_time"),
            convert.optional_time(request, "end_time"),
            states,
        )
        async for chunk in chunks:
            yield U.ExportGenerationsResponse(data=chunk)
