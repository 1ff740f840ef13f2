"""BatchGenerate through a real server in this process (real gRPC socket, PostgreSQL):
one job per spec at the batch price, idempotent retries, a batch accepted or refused
whole (credits, hourly and daily limits, validation naming the spec), the plan's
concurrency kept by the workers' claim, the batch filter of ListGenerations, and the
batch's one signed callback after its last job.

Nothing leaves loopback: the callback receiver is on 127.0.0.1, which the callback test
allowlists explicitly (IMAGEGEN_FETCH_ALLOW_HOSTS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from standardwebhooks.webhooks import Webhook

from imagegen.identity import mint_token
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.inprocess import TEST_JWT_KEY, serve_in_process

E = generation_pb2
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
Stub = generation_pb2_grpc.ImageGenerationServiceStub
T = TypeVar("T")

#: Sizes and counts of the ten specs, and each one's price in the default table
#: (512x512 and under = 1 credit an image, up to 1024x1024 = 2, up to 1536x1536 = 3).
TEN = [
    (256, 256, 1, 1),
    (512, 512, 1, 1),
    (1024, 1024, 1, 2),
    (1024, 1536, 1, 3),
    (1536, 1024, 1, 3),
    (256, 256, 2, 2),
    (512, 512, 3, 3),
    (1024, 1024, 2, 4),
    (256, 256, 4, 4),
    (512, 512, 1, 1),
]


def metadata(user: str = "alice") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


def spec(
    prompt: str, width: int = 256, height: int = 256, count: int = 1
) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt=prompt,
        size=common_pb2.ImageSize(width=width, height=height),
        count=count,
        provider="local",
    )


def plans_file(tmp_path: Path, **free: int | None) -> str:
    """A plan table where `free` (every test user's plan) has the limits given and no
    others."""
    limits = {
        "requests_per_hour": None,
        "requests_per_day": None,
        "concurrent": None,
        "monthly_credits": 1000,
        **free,
    }
    path = tmp_path / "plans.json"
    path.write_text(json.dumps({"plans": {"free": limits}}))
    return str(path)


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, dsn: str, env: dict[str, str] | None = None
) -> AsyncIterator[Stub]:
    async with (
        serve_in_process(tmp_path, dsn, env=env) as running,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{running.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel,
    ):
        yield generation_pb2_grpc.ImageGenerationServiceStub(channel)


async def within(awaitable: Awaitable[T], seconds: float = 60) -> T:
    return await asyncio.wait_for(awaitable, seconds)


async def batch(
    stub: Stub, specs: list[common_pb2.GenerationSpec], user: str = "alice", **kwargs: str
) -> E.BatchGenerateResponse:
    reply: E.BatchGenerateResponse = await stub.BatchGenerate(
        E.BatchGenerateRequest(specs=specs, **kwargs), metadata=metadata(user), timeout=30
    )
    return reply


async def finished(stub: Stub, name: str, user: str = "alice") -> E.Generation:
    """The job once it ended (WaitGeneration until it has)."""
    while True:
        reply = await stub.WaitGeneration(
            E.WaitGenerationRequest(name=name, timeout={"seconds": 30}),
            metadata=metadata(user),
            timeout=40,
        )
        if reply.generation.state in (
            E.GENERATION_STATE_COMPLETED,
            E.GENERATION_STATE_FAILED,
            E.GENERATION_STATE_CANCELLED,
        ):
            return reply.generation


def error_details(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], list[str]]:
    """The ErrorInfo reason and metadata, and the BadRequest field paths, of a refusal."""
    status = rpc_status.from_call(err)
    assert status is not None
    reason, info_metadata, fields = "", {}, []
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason, info_metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, info_metadata, fields


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def rows(dsn: str, user: str = "alice") -> tuple[int, int, int]:
    """The user's generation, batch and credit-ledger rows."""
    conn = await asyncpg.connect(dsn)
    try:
        counted = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM generations WHERE user_id = $1) AS jobs, "
            "(SELECT count(*) FROM batches WHERE user_id = $1) AS batches, "
            "(SELECT count(*) FROM credit_ledger WHERE user_id = $1) AS ledger",
            user,
        )
        return counted["jobs"], counted["batches"], counted["ledger"]
    finally:
        await conn.close()


async def test_a_batch_of_ten_is_ten_jobs_at_the_batch_price_and_a_retry_makes_no_more(
    tmp_path: Path, database_url: str
) -> None:
    specs = [spec(f"lighthouse number {i}", w, h, n) for i, (w, h, n, _) in enumerate(TEN)]
    prices = [price for *_, price in TEN]
    async with served(tmp_path, database_url) as stub:
        first = await batch(stub, specs, request_id="nightly-run-1")

        assert first.batch.startswith("batches/")
        jobs = list(first.generations)
        assert [j.spec.prompt for j in jobs] == [s.prompt for s in specs]
        assert [j.batch for j in jobs] == [first.batch] * 10
        assert [j.credits for j in jobs] == prices
        assert all(j.state == E.GENERATION_STATE_QUEUED for j in jobs)
        assert len({j.name for j in jobs}) == 10

        ended = [await within(finished(stub, j.name)) for j in jobs]
        assert [j.state for j in ended] == [E.GENERATION_STATE_COMPLETED] * 10
        assert [j.credits for j in ended] == prices
        assert [len(j.images) for j in ended] == [n for _, _, n, _ in TEN]
        shown = await stub.GetGeneration(
            E.GetGenerationRequest(name=jobs[3].name), metadata=metadata()
        )
        assert shown.generation.batch == first.batch

        again = await batch(stub, specs, request_id="nightly-run-1")
        assert again.batch == first.batch
        assert [j.name for j in again.generations] == [j.name for j in jobs]
        assert [j.state for j in again.generations] == [E.GENERATION_STATE_COMPLETED] * 10
        assert [len(j.images) for j in again.generations] == [n for _, _, n, _ in TEN]

        listed = await stub.ListGenerations(
            E.ListGenerationsRequest(batch=first.batch, page_size=100), metadata=metadata()
        )
        # Newest first: the batch's last spec is its newest job.
        assert [j.name for j in listed.generations] == [j.name for j in reversed(jobs)]

    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM generations") == 10
        charged = await conn.fetch(
            "SELECT generation_id, -sum(amount) AS kept FROM credit_ledger "
            "WHERE generation_id IS NOT NULL GROUP BY generation_id"
        )
        kept = {str(r["generation_id"]): r["kept"] for r in charged}
        assert [kept[j.name.removeprefix("generations/")] for j in jobs] == prices
        reserved = await conn.fetchval(
            "SELECT -sum(amount) FROM credit_ledger WHERE kind = 'reserve'"
        )
        assert reserved == sum(prices)  # the retry reserved nothing more
    finally:
        await conn.close()


async def test_a_request_id_names_one_batch_or_one_job(tmp_path: Path, database_url: str) -> None:
    env = {"IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1"}
    async with served(tmp_path, database_url, env) as stub:
        await batch(stub, [spec("a"), spec("b")], request_id="rid-1")
        for other in (
            [spec("a"), spec("c")],
            [spec("b"), spec("a")],
            [spec("a")],
            [spec("a"), spec("b", 512, 512)],
        ):
            err = await refused(batch(stub, other, request_id="rid-1"))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_details(err)[0] == "IMG_009"
        err = await refused(
            batch(stub, [spec("a"), spec("b")], request_id="rid-1", callback_uri="http://127.0.0.1:9/hook")
        )
        assert error_details(err)[0] == "IMG_009"
        # A request id is the caller's across RPCs.
        err = await refused(
            stub.SubmitGeneration(
                E.SubmitGenerationRequest(spec=spec("a"), request_id="rid-1"),
                metadata=metadata(),
            )
        )
        assert error_details(err)[0] == "IMG_009"
        await stub.SubmitGeneration(
            E.SubmitGenerationRequest(spec=spec("single"), request_id="rid-2"),
            metadata=metadata(),
        )
        err = await refused(batch(stub, [spec("single")], request_id="rid-2"))
        assert error_details(err)[0] == "IMG_009"
        # Another user's request ids are theirs.
        theirs = await batch(stub, [spec("a"), spec("c")], user="bob", request_id="rid-1")
        assert len(theirs.generations) == 2
    assert (await rows(database_url))[:2] == (3, 1)


async def test_a_batch_over_the_credits_is_refused_whole(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_PLANS_FILE": plans_file(tmp_path, monthly_credits=5)}
    async with served(tmp_path, database_url, env) as stub:
        # 2 + 2 + 2 credits: one more than the month's allowance.
        specs = [spec(f"p{i}", 1024, 1024) for i in range(3)]
        err = await refused(batch(stub, specs, request_id="too-dear"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        reason, info, _ = error_details(err)
        assert (reason, info["required"]) == ("IMG_006", "6")
        assert await rows(database_url) == (0, 0, 0)

        # The same request id is free for a batch that fits: nothing was remembered.
        fits = await batch(stub, [*specs[:2], spec("small", 512, 512)], request_id="too-dear")
        assert [j.credits for j in fits.generations] == [2, 2, 1]


async def test_a_batch_over_the_hourly_or_daily_limit_is_refused_whole(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_PLANS_FILE": plans_file(tmp_path, requests_per_hour=5, requests_per_day=8)}
    async with served(tmp_path, database_url, env) as stub:
        for prompt in ("one", "two"):
            await stub.SubmitGeneration(
                E.SubmitGenerationRequest(spec=spec(prompt)), metadata=metadata()
            )
        err = await refused(batch(stub, [spec(f"b{i}") for i in range(4)]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reason, info, _ = error_details(err)
        assert (reason, info["limit"], info["requested"]) == ("IMG_005", "requests_per_hour", "4")
        assert (await rows(database_url))[:2] == (2, 0)

        # Exactly the room left fits, and then the hour is full for anything.
        accepted = await batch(stub, [spec(f"b{i}") for i in range(3)])
        assert len(accepted.generations) == 3
        err = await refused(batch(stub, [spec("one more")]))
        assert error_details(err)[0] == "IMG_005"
        # A batch larger than a cap never fits: the message says to split it.
        err = await refused(batch(stub, [spec(f"c{i}") for i in range(9)]))
        reason, info, _ = error_details(err)
        assert reason == "IMG_005" and "split" in err.details()
        assert (await rows(database_url))[:2] == (5, 1)


async def test_a_batch_over_the_daily_limit_is_refused_whole(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_PLANS_FILE": plans_file(tmp_path, requests_per_day=4)}
    async with served(tmp_path, database_url, env) as stub:
        await batch(stub, [spec("one"), spec("two")])
        err = await refused(batch(stub, [spec(f"b{i}") for i in range(3)]))
        reason, info, _ = error_details(err)
        assert (reason, info["limit"], info["cap"]) == ("IMG_005", "requests_per_day", "4")
        assert (await rows(database_url))[:2] == (2, 1)
        await batch(stub, [spec("three"), spec("four")])
    assert (await rows(database_url))[:2] == (4, 2)


async def test_a_batch_runs_at_most_the_plans_concurrency_at_a_time(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "IMAGEGEN_PLANS_FILE": plans_file(tmp_path, concurrent=2),
        "IMAGEGEN_WORKERS": "4",
        # Long enough that jobs started together overlap.
        "IMAGEGEN_LOCAL_STEP_DELAY": "0.1",
    }
    async with served(tmp_path, database_url, env) as stub:
        # The concurrent cap does not refuse a batch; its jobs wait their turn.
        accepted = await batch(stub, [spec(f"turn {i}") for i in range(5)])
        ended = [await within(finished(stub, j.name)) for j in accepted.generations]
        assert [j.state for j in ended] == [E.GENERATION_STATE_COMPLETED] * 5

    # Each job ran from its claim (start_time) to the start of the unit of work that ended
    # it (end_time): within the span the claim gate counts it as running, so the overlap
    # seen here is never above the true one.
    spans = [(j.start_time.ToDatetime(), j.end_time.ToDatetime()) for j in ended]
    assert max_overlap(spans) <= 2
    # The jobs started in the batch's order.
    starts = [start for start, _ in spans]
    assert starts == sorted(starts)


async def test_a_batch_job_starts_when_the_one_before_it_ends(
    tmp_path: Path, database_url: str
) -> None:
    # With a 10-minute lease the claim loop's own look comes every 5 minutes: each job
    # of a one-at-a-time batch must be started by the end of the one before it.
    env = {
        "IMAGEGEN_PLANS_FILE": plans_file(tmp_path, concurrent=1),
        "IMAGEGEN_WORKERS": "4",
        "IMAGEGEN_LEASE": "600",
    }
    async with served(tmp_path, database_url, env) as stub:
        accepted = await batch(stub, [spec(f"in turn {i}") for i in range(3)])
        ended = [await within(finished(stub, j.name)) for j in accepted.generations]
        assert [j.state for j in ended] == [E.GENERATION_STATE_COMPLETED] * 3


def max_overlap(spans: list[tuple[datetime, datetime]]) -> int:
    moments = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in moments:
        running += change
        most = max(most, running)
    return most


async def test_invalid_specs_are_refused_naming_their_index(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_MAX_BATCH": "4"}
    async with served(tmp_path, database_url, env) as stub:
        cases: list[tuple[list[common_pb2.GenerationSpec], str, str]] = [
            ([spec("fine"), spec("fine"), spec("   ")], "2", "specs[2].prompt"),
            ([spec("fine"), spec("fine", 300, 300)], "1", "specs[1].size"),
            (
                [spec("fine"), common_pb2.GenerationSpec(prompt="x", style=999)],
                "1",
                "specs[1].style",
            ),
            (
                [
                    spec("fine"),
                    common_pb2.GenerationSpec(
                        prompt="make it blue", sources=[common_pb2.ImageSource(data=b"x")]
                    ),
                ],
                "1",
                "specs[1].sources",
            ),
            ([common_pb2.GenerationSpec(prompt="x", provider="nope")], "0", "specs[0].provider"),
        ]
        for specs, index, field in cases:
            err = await refused(batch(stub, specs))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            reason, info, fields = error_details(err)
            assert (reason, info["index"], info["field"], fields) == (
                "IMG_003",
                index,
                field,
                [field],
            )
            assert err.details().startswith(f"specs[{index}]")

        for specs, limit in (([spec(f"p{i}") for i in range(5)], "4"), ([], "")):
            err = await refused(batch(stub, specs))
            reason, info, fields = error_details(err)
            assert (reason, info["field"], info.get("limit", "")) == ("IMG_003", "specs", limit)
        # The texts of all specs are moderated together; a block names the first spec.
        err = await refused(batch(stub, [spec("fine"), spec("fine"), spec("a p0rn poster")]))
        reason, info, _ = error_details(err)
        assert (reason, info["index"], info["fields"]) == ("IMG_011", "2", "specs[2].prompt")
        err = await refused(batch(stub, [spec("fine")], request_id="not a valid id"))
        assert error_details(err)[1]["field"] == "request_id"
        err = await refused(batch(stub, [spec("fine")], callback_uri="ftp://example.test/"))
        assert error_details(err)[1]["field"] == "callback_uri"
    assert await rows(database_url) == (0, 0, 0)


async def test_list_generations_filters_by_batch(tmp_path: Path, database_url: str) -> None:
    async with served(tmp_path, database_url) as stub:
        mine = await batch(stub, [spec("a"), spec("b"), spec("c")])
        await batch(stub, [spec("d")])
        await stub.SubmitGeneration(E.SubmitGenerationRequest(spec=spec("e")), metadata=metadata())
        theirs = await batch(stub, [spec("f")], user="bob")

        pages, token = [], ""
        while True:
            page = await stub.ListGenerations(
                E.ListGenerationsRequest(batch=mine.batch, page_size=2, page_token=token),
                metadata=metadata(),
            )
            pages.append([j.spec.prompt for j in page.generations])
            token = page.next_page_token
            if not token:
                break
        assert pages == [["c", "b"], ["a"]]
        everything = await stub.ListGenerations(E.ListGenerationsRequest(), metadata=metadata())
        assert len(everything.generations) == 5
        assert sum(1 for j in everything.generations if j.batch) == 4

        other = await stub.ListGenerations(
            E.ListGenerationsRequest(batch=theirs.batch), metadata=metadata()
        )
        assert list(other.generations) == []
        err = await refused(
            stub.ListGenerations(E.ListGenerationsRequest(batch="batches/x"), metadata=metadata())
        )
        assert error_details(err)[1]["field"] == "batch"
        # A page token is bound to its batch.
        first = await stub.ListGenerations(
            E.ListGenerationsRequest(batch=mine.batch, page_size=1), metadata=metadata()
        )
        err = await refused(
            stub.ListGenerations(
                E.ListGenerationsRequest(page_size=1, page_token=first.next_page_token),
                metadata=metadata(),
            )
        )
        assert error_details(err)[1]["field"] == "page_token"


async def test_the_batch_callback_is_sent_once_with_every_job_after_the_last_ends(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1",
        "IMAGEGEN_WEBHOOK_POLL": "0.1",
        "IMAGEGEN_WEBHOOK_RETRY_DELAYS": "0.2",
    }
    async with WebhookReceiver.start([500, 200]) as receiver, served(
        tmp_path, database_url, env
    ) as stub:
        secret = (
            await stub.GetWebhookSecret(E.GetWebhookSecretRequest(), metadata=metadata())
        ).secret.secret
        accepted = await batch(
            stub, [spec("a"), spec("b"), spec("c")], callback_uri=receiver.url()
        )
        names = [j.name for j in accepted.generations]
        # The first attempt is answered 500 and retried with the same webhook-id.
        first, second = await within(receiver.received.wait_for(2))
        ended = [await within(finished(stub, name)) for name in names]

    assert first.webhook_id == second.webhook_id
    body = Webhook(secret).verify(second.body, second.headers)
    assert body["type"] == "batch.completed"
    assert body["data"]["batch"] == accepted.batch
    sent = body["data"]["generations"]
    assert [g["name"] for g in sent] == names
    assert [g["state"] for g in sent] == ["GENERATION_STATE_COMPLETED"] * 3
    assert all(g["batch"] == accepted.batch and g["images"] for g in sent)
    # Sent after the last job ended: its end is in the body.
    assert {g["endTime"] for g in sent} == {
        j.end_time.ToJsonString() for j in ended
    }
    conn = await asyncpg.connect(database_url)
    try:
        queued = await conn.fetch("SELECT state, batch_id, generation_id FROM webhook_deliveries")
        unfinished = await conn.fetchval("SELECT unfinished_jobs FROM batches")
    finally:
        await conn.close()
    assert [(r["state"], r["generation_id"]) for r in queued] == [("delivered", None)]
    assert unfinished == 0


async def test_a_held_batch_job_starts_on_another_replica_when_the_slot_frees(
    tmp_path: Path, database_url: str
) -> None:
    # One slot (the plan's concurrency) and a 10-minute lease, so a claim loop's own look
    # comes every 5 minutes: the second job must be started by the NOTIFY that the first
    # job's end sends from the other replica. Replica X runs the first job and is
    # stopping when it ends (a draining runner claims nothing more), so only Y can.
    env = {
        "IMAGEGEN_PLANS_FILE": plans_file(tmp_path, concurrent=1),
        "IMAGEGEN_WORKERS": "2",
        "IMAGEGEN_LEASE": "600",
        "IMAGEGEN_SHUTDOWN_GRACE": "60",
    }
    async with contextlib.AsyncExitStack() as replica_y:
        replica_x = contextlib.AsyncExitStack()
        async with replica_x:
            stub_x = await replica_x.enter_async_context(
                served(tmp_path / "x", database_url, {**env, "IMAGEGEN_LOCAL_STEP_DELAY": "1.5"})
            )
            accepted = await batch(stub_x, [spec("first"), spec("second")])
            first, second = (job.name for job in accepted.generations)
            await within(started(stub_x, first))
            stub_y = await replica_y.enter_async_context(
                served(tmp_path / "y", database_url, {**env, "IMAGEGEN_LOCAL_STEP_DELAY": "0"})
            )
            ended = asyncio.create_task(finished(stub_y, second))
            # Leaving the block stops X: it lets the first job end, then exits.
        assert (await within(finished(stub_y, first))).state == E.GENERATION_STATE_COMPLETED
        assert (await within(ended, 30)).state == E.GENERATION_STATE_COMPLETED


async def started(stub: Stub, name: str) -> None:
    """Return once a worker has started the job (its STARTED event)."""
    async for response in stub.WatchGeneration(
        E.WatchGenerationRequest(name=name), metadata=metadata(), timeout=60
    ):
        if response.event.type == E.GENERATION_EVENT_TYPE_STARTED:
            return
    raise AssertionError(f"{name} ended without starting")


async def test_a_single_job_that_ends_lets_a_held_batch_job_start_at_once(
    tmp_path: Path, database_url: str
) -> None:
    # As above, a look of the claim loop's own comes every 5 minutes. The batch's job is
    # held while the owner's single job takes the plan's one slot; the single job's end
    # must start it (this replica ignores its own NOTIFYs, so it is told in memory).
    env = {
        "IMAGEGEN_PLANS_FILE": plans_file(tmp_path, concurrent=1),
        "IMAGEGEN_WORKERS": "4",
        "IMAGEGEN_LEASE": "600",
        "IMAGEGEN_LOCAL_STEP_DELAY": "0.5",
    }
    async with served(tmp_path, database_url, env) as stub:
        single = await stub.SubmitGeneration(
            E.SubmitGenerationRequest(spec=spec("single")), metadata=metadata(), timeout=30
        )
        await within(started(stub, single.generation.name))
        accepted = await batch(stub, [spec("held")])
        ended = [
            await within(finished(stub, name), 30)
            for name in (single.generation.name, accepted.generations[0].name)
        ]
        assert [j.state for j in ended] == [E.GENERATION_STATE_COMPLETED] * 2
