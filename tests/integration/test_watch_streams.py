"""Watch streams that scale, and generations near the direct path, counted at the
database's door (tests/pgwire.py): an idle watch sends PostgreSQL nothing, a generation
takes a bounded number of round trips, a watch past the end of a job ends, the open
streams of a user are capped by their plan, and a process's own NOTIFYs are not read
back."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc

from imagegen.identity import mint_token
from imagegen.jobs.signals import JobSignals, NotificationListener
from imagegen.repositories.db import BackendPids, open_pool
from imagegen.repositories.generations import EVENTS_CHANNEL
from tests.fakes.forge_server import ForgeFake, Reply, png_bytes
from tests.inprocess import TEST_JWT_KEY, serve_in_process
from tests.pgwire import CountingProxy

E = generation_pb2
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
#: How long an idle watch is observed. Long enough for any timer a watch might have had
#: (the old poll was 1 s) to fire a few times; no test asserts it took this long.
IDLE_WINDOW = 3.0


def metadata(user: str = "alice", plan: str = "free") -> tuple[tuple[str, str], ...]:
    token = mint_token(TEST_JWT_KEY, user_id=user, plan=plan)
    return (("authorization", f"Bearer {token}"),)


def spec(prompt: str = "a heron at dawn") -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt=prompt, provider="forge", size=common_pb2.ImageSize(width=256, height=256)
    )


def reason_and_retry(err: grpc.aio.AioRpcError) -> tuple[str, float | None]:
    status = rpc_status.from_call(err)
    assert status is not None
    reason, retry = "", None
    for detail in status.details:
        info, delay = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(delay):
            retry = delay.retry_delay.ToTimedelta().total_seconds()
    return reason, retry


class Client:
    """A channel to an in-process server."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        self.stub = generation_pb2_grpc.ImageGenerationServiceStub(self.channel)

    async def submit(self, user: str = "alice") -> E.Generation:
        reply = await self.stub.SubmitGeneration(
            E.SubmitGenerationRequest(spec=spec()), metadata=metadata(user), timeout=30
        )
        return reply.generation

    def watch(
        self, name: str, after: int = 0, user: str = "alice", plan: str = "free", timeout=60
    ) -> grpc.aio.UnaryStreamCall:
        return self.stub.WatchGeneration(
            E.WatchGenerationRequest(name=name, after_sequence=after),
            metadata=metadata(user, plan),
            timeout=timeout,
        )


async def events_until(call: AsyncIterator[E.WatchGenerationResponse], kind: int) -> list[int]:
    """Read a watch until an event of `kind`; returns the sequences read."""
    seen = []
    async for response in call:
        seen.append(response.event.sequence)
        if response.event.type == kind:
            return seen
    raise AssertionError(f"the stream ended before an event of type {kind}: {seen}")


async def drain(call: AsyncIterator[E.WatchGenerationResponse]) -> list[E.GenerationEvent]:
    return [response.event async for response in call]


@pytest.fixture
async def held_forge() -> AsyncIterator[ForgeFake]:
    """A Forge fake whose calls wait until the test releases them (fake.pauses.stop())."""
    async with ForgeFake.start() as fake:
        fake.default = Reply(image=png_bytes(256, 256), delay=600)
        yield fake


def forge_env(fake: ForgeFake, **extra: str) -> dict[str, str]:
    # A lease far longer than the test: its renewals (and the claim loop's half-lease
    # backstop) never fall in an idle window. The webhook worker looks for due callbacks
    # on a timer of its own (jobs/webhooks.py), which has nothing to do with a watch.
    return {
        "BUILT_IN_FORGE_API_URL": fake.url,
        "BUILT_IN_FORGE_API_KEY": "k",
        "IMAGEGEN_LEASE": "600",
        "IMAGEGEN_WEBHOOK_POLL": "600",
        **extra,
    }


async def test_an_idle_watch_sends_nothing_to_the_database(
    tmp_path: Path, database_url: str, held_forge: ForgeFake
) -> None:
    async with (
        CountingProxy.start(database_url) as proxy,
        serve_in_process(tmp_path, proxy.dsn, env=forge_env(held_forge)) as server,
    ):
        client = Client(server.grpc_port)
        job = await client.submit()
        watches = [client.watch(job.name) for _ in range(3)]
        for call in watches:
            assert await events_until(call, E.GENERATION_EVENT_TYPE_STARTED) == [1, 2]
        await held_forge.requests.wait_for(1)
        # The instrument works: the submit, claim and reads went through it.
        assert any("generation_events" in sql for sql in proxy.statements())
        before = proxy.mark()
        await asyncio.sleep(IDLE_WINDOW)  # the observation itself, not a synchronisation
        quiet = proxy.since(before)
        assert quiet == [], f"an idle watch made the server send: {quiet}"
        # The same instrument sees the job's end, and every watch gets it.
        held_forge.pauses.stop()
        for call in watches:
            rest = await drain(call)
            assert [e.sequence for e in rest] == list(range(3, 3 + len(rest)))
            assert rest[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        assert proxy.round_trips(before) > 0
        await client.channel.close()


async def test_a_generation_takes_a_bounded_number_of_round_trips(
    tmp_path: Path, database_url: str
) -> None:
    async with (
        ForgeFake.start() as fake,
        CountingProxy.start(database_url) as proxy,
        serve_in_process(
            tmp_path,
            proxy.dsn,
            env={"BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"},
        ) as server,
    ):
        fake.default = Reply(image=png_bytes(256, 256))
        client = Client(server.grpc_port)

        async def generate() -> list[E.GenerationEvent]:
            call = client.stub.GenerateImage(
                E.GenerateImageRequest(spec=spec()), metadata=metadata(), timeout=60
            )
            return [response.event async for response in call]

        await generate()  # statements are prepared once per connection: warm them up
        counts = []
        for _ in range(3):
            before = proxy.mark()
            events = await generate()
            assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
            counts.append((proxy.round_trips(before), proxy.statements(before)))
        await client.channel.close()
    trips, statements = min(counts, key=lambda c: c[0])
    listing = "\n".join(" ".join(sql.split())[:100] for sql in statements)
    # 70-75 round trips (148-159 statements) before this work, 21 now: the moderation
    # hook's (2: the suspension read, then the decision row of an allowed text), the submit's
    # unit of work (8), the watch's read, the claim, the image's unit of work (4: BEGIN,
    # row, events, COMMIT) and the finish's (5: BEGIN, state and event, settlement,
    # usage, COMMIT).
    assert trips <= 21, f"{trips} round trips:\n{listing}"
    # The pool's reset on release (RESET ALL and friends) is gone.
    assert not any("RESET ALL" in sql or "UNLISTEN" in sql for sql in statements)


async def test_a_watch_past_the_end_of_a_finished_job_ends_at_once(
    tmp_path: Path, database_url: str
) -> None:
    async with (
        ForgeFake.start() as fake,
        serve_in_process(
            tmp_path,
            database_url,
            env={"BUILT_IN_FORGE_API_URL": fake.url, "BUILT_IN_FORGE_API_KEY": "k"},
        ) as server,
    ):
        fake.default = Reply(image=png_bytes(256, 256))
        client = Client(server.grpc_port)
        job = await client.submit()
        events = await drain(client.watch(job.name))
        last = events[-1].sequence
        assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        # At the terminal event, past it, far past it: OK at once with no events (the
        # deadline, far shorter than a hang would be, is not reached).
        for after in (last, last + 1, last + 1000):
            assert await drain(client.watch(job.name, after=after, timeout=10)) == []
        # One before the end still gets the terminal event.
        assert [e.sequence for e in await drain(client.watch(job.name, after=last - 1))] == [last]
        await client.channel.close()


@pytest.mark.parametrize("past", [0, 1])
async def test_a_watch_at_or_past_the_end_of_a_running_job_follows_it(
    tmp_path: Path, database_url: str, held_forge: ForgeFake, past: int
) -> None:
    async with (
        CountingProxy.start(database_url) as proxy,
        serve_in_process(tmp_path, proxy.dsn, env=forge_env(held_forge)) as server,
    ):
        client = Client(server.grpc_port)
        job = await client.submit()
        assert await events_until(client.watch(job.name), E.GENERATION_EVENT_TYPE_STARTED) == [1, 2]
        await held_forge.requests.wait_for(1)
        # The job's last sequence is 2 (STARTED) while its provider works.
        before = proxy.mark()
        reader = asyncio.create_task(drain(client.watch(job.name, after=2 + past)))
        # The follower has read the log (nothing after its sequence, the job running)
        # while the job is held; a watch that ended there would get no events at all.
        await asyncio.wait_for(proxy.wait_for_statement("job_last_sequence", before), 30)
        held_forge.pauses.stop()
        rest = await reader
        assert rest, "a watch past a running job's end follows it"
        assert [e.sequence for e in rest] == list(range(3 + past, 3 + past + len(rest)))
        assert rest[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        await client.channel.close()


async def test_open_streams_are_capped_per_user_by_plan(
    tmp_path: Path, database_url: str, held_forge: ForgeFake
) -> None:
    plans = tmp_path / "plans.json"
    plans.write_text(
        json.dumps(
            {
                "plans": {
                    "free": {"monthly_credits": 1000, "max_streams": 2},
                    "pro": {"monthly_credits": 1000, "max_streams": 3},
                }
            }
        )
    )
    env = forge_env(held_forge, IMAGEGEN_PLANS_FILE=str(plans))
    async with serve_in_process(tmp_path, database_url, env=env) as server:
        client = Client(server.grpc_port)
        job = await client.submit()
        first, second = client.watch(job.name), client.watch(job.name)
        for call in (first, second):
            await events_until(call, E.GENERATION_EVENT_TYPE_QUEUED)
        # The third stream of a free user is refused, with a reason and a delay.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await drain(client.watch(job.name))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_and_retry(refused.value) == ("STREAM_LIMIT", 5.0)
        # GenerateImage counts too, and is refused before any job exists.
        jobs_before = await count_jobs(database_url)
        with pytest.raises(grpc.aio.AioRpcError) as generate_refused:
            async for _ in client.stub.GenerateImage(
                E.GenerateImageRequest(spec=spec()), metadata=metadata(), timeout=30
            ):
                pass
        assert reason_and_retry(generate_refused.value)[0] == "STREAM_LIMIT"
        assert await count_jobs(database_url) == jobs_before
        # Another user is not affected; the cap follows the plan the token names.
        bob_job = await client.submit("bob")
        await events_until(client.watch(bob_job.name, user="bob"), E.GENERATION_EVENT_TYPE_QUEUED)
        third = client.watch(job.name, plan="pro")
        await events_until(third, E.GENERATION_EVENT_TYPE_QUEUED)
        third.cancel()
        # Closing a stream frees its slot.
        first.cancel()
        await wait_until_accepted(client, job.name)
        await client.channel.close()


async def wait_until_accepted(client: Client, name: str) -> None:
    """The server frees a cancelled stream's slot once it sees the cancel; until then a
    new watch is refused (each refused attempt is a round trip: the retry's own wait)."""
    for _ in range(500):
        call = client.watch(name, timeout=30)
        try:
            await events_until(call, E.GENERATION_EVENT_TYPE_QUEUED)
            call.cancel()
            return
        except grpc.aio.AioRpcError as err:
            assert reason_and_retry(err)[0] == "STREAM_LIMIT"
    raise AssertionError("a closed stream never freed its slot")


async def count_jobs(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM generations"))
    finally:
        await conn.close()


async def test_the_listener_ignores_its_own_process_notifies(database_url: str) -> None:
    signals = JobSignals()
    pids = BackendPids()
    pool = await open_pool(database_url, max_size=2, backend_pids=pids)
    listener = NotificationListener(database_url, signals, own_pids=pids)
    await listener.start()
    other = await asyncpg.connect(database_url)
    try:
        job = str(uuid.uuid4())
        with signals.watch_job(job) as feed:
            feed.take()  # the listener's start woke everyone; begin from here
            # Our pool's NOTIFY first, then another process's: they arrive in commit order.
            await pool.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, job)
            await other.execute("SELECT pg_notify($1, $2)", EVENTS_CHANNEL, job)
            await asyncio.wait_for(feed.changed.wait(), timeout=30)
            assert feed.take() == ([], True)
        assert (listener.received, listener.ignored) == (2, 1)
        assert len(pids) >= 1
    finally:
        await other.close()
        await listener.stop()
        await pool.close()
    # A closed connection's pid is forgotten before PostgreSQL can hand it to another.
    assert len(pids) == 0


async def test_progress_events_are_coalesced_in_order_without_gaps(database_url: str) -> None:
    from imagegen.domain.models import EventType, GenerationSpec
    from imagegen.repositories.generations import NewEvent, NewGeneration
    from imagegen.repositories.unit_of_work import PostgresDatabase
    from imagegen.services.generations.pipeline import _EventWriter

    def progress(percent: int, preview: bytes | None = None) -> NewEvent:
        return NewEvent(EventType.PROGRESS, {"percent": percent, "stage": "s"}, preview)

    async with CountingProxy.start(database_url) as proxy:
        pool = await open_pool(proxy.dsn, max_size=2)
        blocker = await asyncpg.connect(database_url)
        try:
            db = PostgresDatabase(pool)
            job = str(uuid.uuid4())
            async with db.unit_of_work() as uow:
                await uow.generations.insert(
                    NewGeneration(job, "alice", "", "", GenerationSpec(prompt="p"), "local", 1, {})
                )
                await uow.generations.announce_queued(job)
                await uow.commit()
            signals = JobSignals()
            writer = _EventWriter(job, db, signals)
            # The job row locked elsewhere: the writer's first append waits on it.
            await blocker.execute("BEGIN")
            await blocker.execute(
                "SELECT 1 FROM generations WHERE id = $1 FOR UPDATE", uuid.UUID(job)
            )
            before = proxy.mark()
            with signals.watch_job(job) as feed:
                await writer.progress(progress(10))
                await asyncio.wait_for(proxy.wait_for_statement("cardinality", before), 30)
                # While it waits: a percent-only event is replaced by a newer one, one with
                # a preview is kept.
                await writer.progress(progress(20))
                await writer.progress(progress(30, b"preview-30"))
                await writer.progress(progress(40))
                await writer.progress(progress(50))
                await blocker.execute("COMMIT")
                handed: list[int] = []
                while 50 not in handed:
                    await asyncio.wait_for(feed.changed.wait(), 30)
                    events, stale = feed.take()
                    assert not stale
                    handed += [e.percent for e in events]
            assert handed == [10, 30, 50]
            assert writer.coalesced == 2
            assert await writer.take() == []
            # Two statements for four events; the log is gap-free and in order.
            assert len([s for s in proxy.statements(before) if "cardinality" in s]) == 2
            page = await db.generations.read_log(job, 0)
            assert [(e.sequence, e.percent, e.preview) for e in page.events] == [
                (1, 0, b""),
                (2, 10, b""),
                (3, 30, b"preview-30"),
                (4, 50, b""),
            ]
        finally:
            await blocker.close()
            await pool.close()


async def test_a_cancel_on_another_replica_stops_the_provider_call_at_once(
    tmp_path: Path, database_url: str, held_forge: ForgeFake
) -> None:
    async with serve_in_process(tmp_path / "a", database_url, env=forge_env(held_forge)) as a:
        runner = Client(a.grpc_port)
        job = await runner.submit()
        watch = runner.watch(job.name)
        assert await events_until(watch, E.GENERATION_EVENT_TYPE_STARTED) == [1, 2]
        await held_forge.requests.wait_for(1)
        # A second replica starts while the job runs on the first (its lease is long,
        # so it cannot take the job) and takes the cancel.
        async with serve_in_process(tmp_path / "b", database_url, env=forge_env(held_forge)) as b:
            other = Client(b.grpc_port)
            reply = await other.stub.CancelGeneration(
                E.CancelGenerationRequest(name=job.name), metadata=metadata(), timeout=30
            )
            assert reply.generation.state == E.GENERATION_STATE_RUNNING
            # The first replica hears it by NOTIFY and abandons the held call: the job
            # ends long before the provider would have answered.
            rest = await asyncio.wait_for(drain(watch), 30)
            await other.channel.close()
        assert rest[-1].type == E.GENERATION_EVENT_TYPE_CANCELLED
        assert len(held_forge.requests) == 1
        await runner.channel.close()
