"""Durable jobs across served processes: watch anywhere, survive kill -9, idempotent
submits, cancel, drain on SIGTERM, a lost LISTEN connection, history, the client helper."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg
import grpc
import pytest
from imagegen.v1 import common_pb2, generation_pb2

from imagegen.client import ImageGenClient
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e
E = generation_pb2


def spec(prompt: str = "a patient heron", count: int = 1) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt=prompt, count=count, size=common_pb2.ImageSize(width=256, height=256)
    )


async def submit(server: ServedProcess, request: E.SubmitGenerationRequest, user: str = "alice"):
    async with server.channel() as channel:
        reply = await server.stub(channel).SubmitGeneration(
            request, metadata=server.metadata(user), timeout=30
        )
        return reply.generation


async def watch(
    server: ServedProcess, name: str, after: int = 0, *, stop_after: int | None = None
) -> list[E.GenerationEvent]:
    events: list[E.GenerationEvent] = []
    async with server.channel() as channel:
        async for response in server.stub(channel).WatchGeneration(
            E.WatchGenerationRequest(name=name, after_sequence=after),
            metadata=server.metadata(),
            timeout=90,
        ):
            events.append(response.event)
            if stop_after is not None and response.event.sequence >= stop_after:
                break
    return events


async def query(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def assert_gap_free(events: list[E.GenerationEvent], start: int = 1) -> None:
    assert [e.sequence for e in events] == list(range(start, start + len(events)))


async def log_is_gap_free(dsn: str, generation: str) -> None:
    rows = await query(
        dsn,
        "SELECT sequence FROM generation_events WHERE generation_id = $1 ORDER BY sequence",
        __import__("uuid").UUID(generation.removeprefix("generations/")),
    )
    assert [r["sequence"] for r in rows] == list(range(1, len(rows) + 1))


async def wait_for_state(dsn: str, generation: str, state: str, timeout: float = 30) -> None:
    gid = __import__("uuid").UUID(generation.removeprefix("generations/"))
    for _ in range(int(timeout / 0.1)):
        rows = await query(dsn, "SELECT state FROM generations WHERE id = $1", gid)
        if rows and rows[0]["state"] == state:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{generation} never reached {state}")


async def test_submitted_on_one_replica_watched_on_another(tmp_path: Path, database_url: str):
    a = await start_server(tmp_path, database_url, name="a")
    b = await start_server(tmp_path, database_url, name="b")
    try:
        generation = await submit(a, E.SubmitGenerationRequest(spec=spec()))
        events = await watch(b, generation.name)
        assert_gap_free(events)
        assert events[0].type == E.GENERATION_EVENT_TYPE_QUEUED
        assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
        # Resuming from any sequence k gives exactly the events after k.
        k = len(events) // 2
        resumed = await watch(a, generation.name, after=k)
        assert [e.sequence for e in resumed] == [e.sequence for e in events[k:]]
        assert [e.type for e in resumed] == [e.type for e in events[k:]]
    finally:
        a.kill()
        b.kill()


async def test_a_watch_cut_mid_job_resumes_with_exactly_the_rest(
    tmp_path: Path, database_url: str
) -> None:
    server = await start_server(
        tmp_path, database_url, extra_env={"IMAGEGEN_LOCAL_STEP_DELAY": "0.3"}
    )
    try:
        generation = await submit(server, E.SubmitGenerationRequest(spec=spec()))
        first = await watch(server, generation.name, stop_after=3)
        assert [e.sequence for e in first] == [1, 2, 3]
        rest = await watch(server, generation.name, after=3)
        assert_gap_free(rest, start=4)
        assert rest[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    finally:
        server.kill()


@pytest.mark.parametrize("max_attempts", [3, 1])
async def test_kill_9_mid_job_another_replica_finishes_or_fails_it(
    tmp_path: Path, database_url: str, max_attempts: int
) -> None:
    env = {
        "IMAGEGEN_LOCAL_STEP_DELAY": "1.0",
        "IMAGEGEN_LEASE": "2",
        "IMAGEGEN_MAX_ATTEMPTS": str(max_attempts),
    }
    a = await start_server(tmp_path, database_url, name="a", extra_env=env)
    b: ServedProcess | None = None
    try:
        generation = await submit(a, E.SubmitGenerationRequest(spec=spec()))
        events = await watch(a, generation.name, stop_after=3)
        assert events[1].type == E.GENERATION_EVENT_TYPE_STARTED
        a.kill()
        await a.wait_exit(10)
        b = await start_server(tmp_path, database_url, name="b", extra_env=env)
        rest = await watch(b, generation.name, after=events[-1].sequence)
        await log_is_gap_free(database_url, generation.name)
        terminal = [
            e
            for e in events + rest
            if e.type in (E.GENERATION_EVENT_TYPE_COMPLETED, E.GENERATION_EVENT_TYPE_FAILED)
        ]
        assert len(terminal) == 1
        images = await query(database_url, "SELECT id FROM images")
        usage = await query(database_url, "SELECT status, credits FROM usage_records")
        row = (await query(database_url, "SELECT state, credits, attempts FROM generations"))[0]
        if max_attempts >= 2:
            assert terminal[0].type == E.GENERATION_EVENT_TYPE_COMPLETED
            assert len(images) == 1
            assert [tuple(u) for u in usage] == [("succeeded", 1)]
            assert (row["state"], row["credits"], row["attempts"]) == ("completed", 1, 2)
        else:
            assert terminal[0].type == E.GENERATION_EVENT_TYPE_FAILED
            assert images == []
            assert sum(u["credits"] for u in usage) == 0
            assert (row["state"], row["credits"]) == ("failed", 0)
    finally:
        a.kill()
        if b is not None:
            b.kill()


async def test_twenty_concurrent_duplicates_make_one_job(tmp_path: Path, database_url: str):
    server = await start_server(tmp_path, database_url)
    try:
        request = E.SubmitGenerationRequest(spec=spec(), request_id="agent-run-42")
        replies = await asyncio.gather(*(submit(server, request) for _ in range(20)))
        assert len({r.name for r in replies}) == 1
        await watch(server, replies[0].name)
        assert len(await query(database_url, "SELECT id FROM generations")) == 1
        assert len(await query(database_url, "SELECT id FROM images")) == 1
        assert len(await query(database_url, "SELECT id FROM usage_records")) == 1
        again = await submit(server, request)
        assert again.name == replies[0].name
        assert again.state == E.GENERATION_STATE_COMPLETED
        # Another user's request_id space is their own.
        other = await submit(server, request, user="bob")
        assert other.name != replies[0].name
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(
                server,
                E.SubmitGenerationRequest(spec=spec("another prompt"), request_id="agent-run-42"),
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        from tests.e2e.test_generate import error_reason

        assert error_reason(caught.value) == "IMG_009"
    finally:
        server.kill()


async def test_cancel_queued_running_and_mid_batch(tmp_path: Path, database_url: str) -> None:
    server = await start_server(
        tmp_path,
        database_url,
        extra_env={"IMAGEGEN_WORKERS": "1", "IMAGEGEN_LOCAL_STEP_DELAY": "0.5"},
    )
    try:
        async with server.channel() as channel:
            stub = server.stub(channel)
            md = server.metadata()
            running = await submit(server, E.SubmitGenerationRequest(spec=spec("runs")))
            batch = await submit(server, E.SubmitGenerationRequest(spec=spec("batch", count=4)))
            queued = await submit(server, E.SubmitGenerationRequest(spec=spec("waits")))

            # Queued: cancelled at once.
            await wait_for_state(database_url, running.name, "running")
            reply = await stub.CancelGeneration(
                E.CancelGenerationRequest(name=queued.name), metadata=md
            )
            assert reply.generation.state == E.GENERATION_STATE_CANCELLED
            # Running: cancelled at its next checkpoint, its provider call abandoned.
            await stub.CancelGeneration(E.CancelGenerationRequest(name=running.name), metadata=md)
            running_events = await watch(server, running.name)
            assert running_events[-1].type == E.GENERATION_EVENT_TYPE_CANCELLED
            # A batch of 4, cancelled after its first image.
            batch_events: list[E.GenerationEvent] = []
            async for response in stub.WatchGeneration(
                E.WatchGenerationRequest(name=batch.name), metadata=md, timeout=60
            ):
                batch_events.append(response.event)
                if response.event.type == E.GENERATION_EVENT_TYPE_IMAGE_READY:
                    await stub.CancelGeneration(
                        E.CancelGenerationRequest(name=batch.name), metadata=md
                    )
            assert batch_events[-1].type == E.GENERATION_EVENT_TYPE_CANCELLED
            # Cancelling a finished job returns it unchanged; another user's is NOT_FOUND.
            done = await stub.CancelGeneration(
                E.CancelGenerationRequest(name=batch.name), metadata=md
            )
            assert done.generation.state == E.GENERATION_STATE_CANCELLED
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await stub.CancelGeneration(
                    E.CancelGenerationRequest(name=batch.name), metadata=server.metadata("bob")
                )
            assert other.value.code() == grpc.StatusCode.NOT_FOUND
        rows = {
            r["prompt"]: r
            for r in await query(database_url, "SELECT prompt, state, credits FROM generations")
        }
        assert {p: r["state"] for p, r in rows.items()} == {
            "runs": "cancelled",
            "batch": "cancelled",
            "waits": "cancelled",
        }
        images = await query(database_url, "SELECT prompt FROM images")
        delivered = sum(1 for i in images if i["prompt"] == "batch")
        assert delivered >= 1 and all(i["prompt"] == "batch" for i in images)
        # Charged only for what was delivered (1 credit per 256x256 image).
        assert (rows["runs"]["credits"], rows["waits"]["credits"]) == (0, 0)
        assert rows["batch"]["credits"] == delivered
        blobs = [p for p in (server.data_dir / "blobs").rglob("*.png")]
        assert len(blobs) == delivered, "no half-stored image"
    finally:
        server.kill()


async def test_sigterm_with_queued_and_running_jobs_loses_none(
    tmp_path: Path, database_url: str
) -> None:
    env = {
        "IMAGEGEN_WORKERS": "1",
        "IMAGEGEN_LOCAL_STEP_DELAY": "1.0",
        "IMAGEGEN_SHUTDOWN_GRACE": "2",
    }
    a = await start_server(tmp_path, database_url, name="a", extra_env=env)
    b: ServedProcess | None = None
    try:
        first = await submit(a, E.SubmitGenerationRequest(spec=spec("first")))
        second = await submit(a, E.SubmitGenerationRequest(spec=spec("second")))
        await wait_for_state(database_url, first.name, "running")
        watcher_error: list[grpc.aio.AioRpcError] = []
        seen: list[E.GenerationEvent] = []

        async def follow() -> None:
            try:
                seen.extend(await watch(a, second.name))
            except grpc.aio.AioRpcError as err:
                watcher_error.append(err)

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0.3)
        a.terminate()
        await follower
        assert watcher_error and watcher_error[0].code() == grpc.StatusCode.UNAVAILABLE
        assert await a.wait_exit(2 + 6) == 0
        b = await start_server(tmp_path, database_url, name="b", extra_env=env)
        after = seen[-1].sequence if seen else 0
        for generation in (first, second):
            events = await watch(b, generation.name, after=after if generation is second else 0)
            assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
            await log_is_gap_free(database_url, generation.name)
    finally:
        a.kill()
        if b is not None:
            b.kill()


async def test_a_terminated_listener_reconnects_and_watchers_get_every_event(
    tmp_path: Path, database_url: str
) -> None:
    server = await start_server(
        tmp_path, database_url, extra_env={"IMAGEGEN_LOCAL_STEP_DELAY": "0.3"}
    )
    try:
        listening = (
            "SELECT pid FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND datname = current_database()"
        )
        before = {r["pid"] for r in await query(database_url, listening)}
        assert before
        generation = await submit(server, E.SubmitGenerationRequest(spec=spec()))
        watching = asyncio.create_task(watch(server, generation.name))
        await asyncio.sleep(0.3)
        await query(database_url, f"SELECT pg_terminate_backend(pid) FROM ({listening}) l")
        after: set[int] = set()
        for _ in range(100):
            after = {r["pid"] for r in await query(database_url, listening)}
            if after and not after & before:
                break
            await asyncio.sleep(0.1)
        assert after and not after & before, "a new listening connection appeared"
        events = await watching
        assert_gap_free(events)
        assert events[-1].type == E.GENERATION_EVENT_TYPE_COMPLETED
    finally:
        server.kill()


async def test_list_generations_pages_by_state_and_rerun(tmp_path: Path, database_url: str):
    server = await start_server(
        tmp_path,
        database_url,
        extra_env={"IMAGEGEN_WORKERS": "1", "IMAGEGEN_LOCAL_STEP_DELAY": "0.4"},
    )
    try:
        made = []
        for i in range(3):
            generation = await submit(server, E.SubmitGenerationRequest(spec=spec(f"p{i}")))
            await watch(server, generation.name)
            made.append(generation.name)
        await submit(server, E.SubmitGenerationRequest(spec=spec("bob's")), user="bob")
        bob_job = await query(database_url, "SELECT id FROM generations WHERE user_id = 'bob'")
        await wait_for_state(database_url, str(bob_job[0]["id"]), "completed")
        running = await submit(server, E.SubmitGenerationRequest(spec=spec("running")))
        await wait_for_state(database_url, running.name, "running")
        queued = await submit(server, E.SubmitGenerationRequest(spec=spec("queued")))
        cancelled = await submit(server, E.SubmitGenerationRequest(spec=spec("cancelled")))
        async with server.channel() as channel:
            stub = server.stub(channel)
            md = server.metadata()
            await stub.CancelGeneration(E.CancelGenerationRequest(name=cancelled.name), metadata=md)
            names: list[str] = []
            token = ""
            while True:
                page = await stub.ListGenerations(
                    E.ListGenerationsRequest(page_size=2, page_token=token), metadata=md
                )
                assert len(page.generations) <= 2
                names += [g.name for g in page.generations]
                token = page.next_page_token
                if not token:
                    break
            assert names == list(reversed([*made, running.name, queued.name, cancelled.name]))

            async def listed(state: int) -> list[str]:
                reply = await stub.ListGenerations(
                    E.ListGenerationsRequest(states=[state]), metadata=md
                )
                return [g.name for g in reply.generations]

            assert await listed(E.GENERATION_STATE_COMPLETED) == list(reversed(made))
            assert await listed(E.GENERATION_STATE_RUNNING) == [running.name]
            assert await listed(E.GENERATION_STATE_QUEUED) == [queued.name]
            assert await listed(E.GENERATION_STATE_CANCELLED) == [cancelled.name]
            assert await listed(E.GENERATION_STATE_FAILED) == []
            bobs = await stub.ListGenerations(
                E.ListGenerationsRequest(), metadata=server.metadata("bob")
            )
            assert [g.spec.prompt for g in bobs.generations] == ["bob's"]
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await stub.ListGenerations(E.ListGenerationsRequest(page_size=101), metadata=md)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as bad_token:
                await stub.ListGenerations(
                    E.ListGenerationsRequest(page_token="not-a-token"), metadata=md
                )
            assert bad_token.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            rerun = await stub.RerunGeneration(E.RerunGenerationRequest(name=made[0]), metadata=md)
            assert rerun.generation.name not in made
            assert rerun.generation.spec.prompt == "p0"
            assert rerun.generation.spec.size.width == 256
            with pytest.raises(grpc.aio.AioRpcError) as other:
                await stub.RerunGeneration(
                    E.RerunGenerationRequest(name=made[0]), metadata=server.metadata("bob")
                )
            assert other.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_client_helper_survives_a_server_restart(tmp_path: Path, database_url: str):
    port = free_port()
    env = {
        "IMAGEGEN_GRPC_PORT": str(port),
        "IMAGEGEN_LOCAL_STEP_DELAY": "0.8",
        "IMAGEGEN_SHUTDOWN_GRACE": "1",
    }
    a = await start_server(tmp_path, database_url, name="a", extra_env=env)
    b: ServedProcess | None = None
    try:
        client = ImageGenClient(f"127.0.0.1:{port}", a.token(), timeout=90, retry_delay=0.2)
        started = asyncio.Event()

        def on_event(event: E.GenerationEvent) -> None:
            if event.type == E.GENERATION_EVENT_TYPE_STARTED:
                started.set()

        async with client:
            job = asyncio.create_task(client.generate(spec(), on_event=on_event))
            await asyncio.wait_for(started.wait(), timeout=30)
            a.terminate()
            await a.wait_exit(10)
            b = await start_server(tmp_path, database_url, name="b", extra_env=env)
            result = await asyncio.wait_for(job, timeout=90)
        assert result.state == "completed"
        assert len(result.images) == 1
        assert result.images[0].uri
    finally:
        a.kill()
        if b is not None:
            b.kill()
