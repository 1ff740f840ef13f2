"""Signed webhooks through a real server in this process and a loopback receiver: the
Standard Webhooks signature checked with the scheme's reference library
(`standardwebhooks`), retries with the same webhook-id, the outbox across restarts,
rotation with its grace period, the SSRF guard at submit, and attempts on the Generation.

Nothing leaves loopback: the receiver is on 127.0.0.1, which the tests allowlist
explicitly (IMAGEGEN_FETCH_ALLOW_HOSTS); the refusal tests run without the allowlist."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegen.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imagegen.domain.models import GenerationState
from imagegen.domain.webhooks import event_type_for, new_webhook_id
from imagegen.identity import mint_token
from imagegen.repositories.db import open_pool
from imagegen.repositories.webhooks import NewWebhook, WebhookOutbox
from tests.fakes.webhook_receiver import ReceivedWebhook, WebhookReceiver
from tests.inprocess import TEST_JWT_KEY, serve_in_process

E = generation_pb2
CHANNEL_OPTIONS = (("grpc.enable_http_proxy", 0),)
#: What every test that delivers needs: the loopback receiver allowlisted, quick looks
#: for due callbacks, quick retries.
DELIVERING = {
    "IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1",
    "IMAGEGEN_WEBHOOK_POLL": "0.1",
    "IMAGEGEN_WEBHOOK_RETRY_DELAYS": "0.2",
}
T = TypeVar("T")
Stub = generation_pb2_grpc.ImageGenerationServiceStub


def metadata(user: str = "alice") -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(TEST_JWT_KEY, user_id=user)}"),)


def spec(prompt: str = "a heron at dawn") -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt=prompt, size=common_pb2.ImageSize(width=256, height=256)
    )


@contextlib.asynccontextmanager
async def served(tmp_path: Path, dsn: str, env: dict[str, str]) -> AsyncIterator[Stub]:
    async with (
        serve_in_process(tmp_path, dsn, env=env) as running,
        grpc.aio.insecure_channel(
            f"127.0.0.1:{running.grpc_port}", options=CHANNEL_OPTIONS
        ) as channel,
    ):
        yield generation_pb2_grpc.ImageGenerationServiceStub(channel)


async def within(awaitable: Awaitable[T], seconds: float = 30) -> T:
    return await asyncio.wait_for(awaitable, seconds)


class AttemptsRecorded(logging.Handler):
    """Hears the in-process server's delivery log each attempt once it is recorded
    (`webhook.attempt`, written after the record commits): what a test waits for
    instead of reading the outbox over and over."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.heard = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", "") == "webhook.attempt":
            self.heard.set()


ATTEMPTS = AttemptsRecorded()


@pytest.fixture(autouse=True)
def attempts_recorded() -> Iterator[AttemptsRecorded]:
    logger = logging.getLogger("imagegen.services.webhooks.delivery")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(ATTEMPTS)
    try:
        yield ATTEMPTS
    finally:
        logger.removeHandler(ATTEMPTS)
        logger.setLevel(level)


async def eventually(read: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """Read a state until it is what the test waits for: again after each attempt the
    server records (bounded at 30 s in all). Cleared before each read, so an attempt
    recorded after it is never missed."""
    async with asyncio.timeout(30):
        while True:
            ATTEMPTS.heard.clear()
            value = await read()
            if done(value):
                return value
            await ATTEMPTS.heard.wait()


async def secret_of(stub: Stub, user: str = "alice") -> str:
    reply = await stub.GetWebhookSecret(E.GetWebhookSecretRequest(), metadata=metadata(user))
    return reply.secret.secret


async def submit(stub: Stub, callback_uri: str, user: str = "alice", **kwargs) -> E.Generation:
    reply = await stub.SubmitGeneration(
        E.SubmitGenerationRequest(spec=spec(), callback_uri=callback_uri, **kwargs),
        metadata=metadata(user),
        timeout=30,
    )
    return reply.generation


async def deliveries(stub: Stub, name: str, count: int) -> list[E.WebhookDelivery]:
    """The job's webhook attempts once `count` of them are recorded."""

    async def read() -> list[E.WebhookDelivery]:
        reply = await stub.GetGeneration(E.GetGenerationRequest(name=name), metadata=metadata())
        return list(reply.generation.webhook_deliveries)

    return await eventually(read, lambda attempts: len(attempts) >= count)


async def fetch_state(dsn: str, webhook_id: str) -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        state: str | None = await conn.fetchval(
            "SELECT state FROM webhook_deliveries WHERE webhook_id = $1", webhook_id
        )
        return state
    finally:
        await conn.close()


def verified(received: ReceivedWebhook, secret: str) -> dict:
    """The body, if the reference implementation accepts the signature with `secret`."""
    return Webhook(secret).verify(received.body, received.headers)


def reason_and_field(err: grpc.aio.AioRpcError) -> tuple[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, info.metadata.get("field", "")
    raise AssertionError("no ErrorInfo")


async def test_delivered_with_a_valid_signature_and_visible_on_the_generation(
    tmp_path: Path, database_url: str
) -> None:
    async with WebhookReceiver.start() as receiver, served(
        tmp_path, database_url, DELIVERING
    ) as stub:
        secret = await secret_of(stub)
        job = await submit(stub, receiver.url())
        # Shown without its query string, which may carry the receiver's token.
        assert job.callback_uri == receiver.url(query="")
        assert not job.webhook_deliveries
        (received,) = await within(receiver.received.wait_for(1))

        body = verified(received, secret)
        assert received.path == "/hook" and received.query == "token=s3cr3t"
        assert received.headers["content-type"] == "application/json"
        assert received.webhook_id.startswith("msg_")
        assert body["type"] == "generation.completed"
        generation = body["data"]["generation"]
        assert generation["name"] == job.name
        assert generation["state"] == "GENERATION_STATE_COMPLETED"
        assert generation["callbackUri"] == receiver.url(query="")
        assert generation["images"][0]["uri"].startswith("http")
        assert body["timestamp"].endswith("Z")
        # Someone else's secret does not verify it.
        other = "whsec_" + base64.b64encode(b"\x01" * 32).decode()
        with pytest.raises(WebhookVerificationError):
            verified(received, other)

        (attempt,) = await deliveries(stub, job.name, 1)
        assert attempt.webhook_id == received.webhook_id
        assert attempt.attempt == 1 and attempt.delivered and attempt.http_status == 200
        assert attempt.error == "" and attempt.attempt_time.seconds > 0
        listed = await stub.ListGenerations(E.ListGenerationsRequest(), metadata=metadata())
        assert [g.webhook_deliveries[0].delivered for g in listed.generations] == [True]


async def test_retried_after_a_500_with_the_same_webhook_id(
    tmp_path: Path, database_url: str
) -> None:
    async with WebhookReceiver.start([500, 200]) as receiver, served(
        tmp_path, database_url, DELIVERING
    ) as stub:
        secret = await secret_of(stub)
        job = await submit(stub, receiver.url())
        first, second = await within(receiver.received.wait_for(2))
        assert first.webhook_id == second.webhook_id
        assert verified(first, secret)["data"]["generation"]["name"] == job.name
        assert verified(second, secret)["data"]["generation"]["name"] == job.name
        attempts = await deliveries(stub, job.name, 2)
        assert [(a.attempt, a.http_status, a.delivered) for a in attempts] == [
            (1, 500, False),
            (2, 200, True),
        ]
        assert "500" in attempts[0].error and attempts[1].error == ""
        assert {a.webhook_id for a in attempts} == {first.webhook_id}


async def test_a_redirect_is_a_failed_attempt_and_attempts_run_out(
    tmp_path: Path, database_url: str
) -> None:
    env = {**DELIVERING, "IMAGEGEN_WEBHOOK_MAX_ATTEMPTS": "2"}
    async with WebhookReceiver.start(["redirect"]) as receiver, served(
        tmp_path, database_url, env
    ) as stub:
        job = await submit(stub, receiver.url())
        attempts = await deliveries(stub, job.name, 2)
        assert [(a.http_status, a.delivered) for a in attempts] == [(302, False), (302, False)]
        assert "redirect" in attempts[0].error
        # The redirect was never followed: the receiver only ever saw /hook.
        assert {r.path for r in receiver.received} == {"/hook"}
        assert len(receiver.received) == 2


async def test_the_outbox_survives_restarts(
    tmp_path: Path, database_url: str
) -> None:
    """A callback queued while no worker listens is sent by the next server's first look;
    one recorded as delivered is never sent again."""
    async with WebhookReceiver.start() as receiver:
        async with served(tmp_path, database_url, DELIVERING) as stub:
            secret = await secret_of(stub)
            first = await submit(stub, "")
            ended = await stub.WaitGeneration(
                E.WaitGenerationRequest(name=first.name), metadata=metadata(), timeout=60
            )
            assert ended.generation.state == E.GENERATION_STATE_COMPLETED
        # Its callback, queued as the unit of work that ends a job queues it, by a replica
        # that stopped at once: the NOTIFY reached no worker.
        pool = await open_pool(database_url)
        try:
            await WebhookOutbox(pool).enqueue(
                NewWebhook(
                    webhook_id=new_webhook_id(),
                    user_id="alice",
                    url=receiver.url(),
                    event_type=event_type_for(GenerationState.COMPLETED).value,
                    generation_id=first.name.removeprefix("generations/"),
                )
            )
        finally:
            await pool.close()
        assert len(receiver.received) == 0

        async with served(tmp_path, database_url, DELIVERING):
            (received,) = await within(receiver.received.wait_for(1))
            assert verified(received, secret)["data"]["generation"]["name"] == first.name
            # Recorded as delivered before this server stops (the job named no callback
            # of its own, so GetGeneration does not list the attempt).
            await eventually(
                lambda: fetch_state(database_url, received.webhook_id),
                lambda state: state == "delivered",
            )

        async with served(tmp_path, database_url, DELIVERING) as stub:
            # A second job's callback arrives after the worker's first looks: by then the
            # delivered one would have been claimed again, had it been due.
            second = await submit(stub, receiver.url())
            await within(receiver.received.wait_for(2))
            await deliveries(stub, second.name, 1)
        ids = [r.webhook_id for r in receiver.received]
        assert len(ids) == 2 and len(set(ids)) == 2
        assert len(receiver.for_webhook(received.webhook_id)) == 1


async def test_an_attempt_cut_by_shutdown_is_sent_again_by_the_next_server(
    tmp_path: Path, database_url: str
) -> None:
    env = {**DELIVERING, "IMAGEGEN_WEBHOOK_TIMEOUT": "60", "IMAGEGEN_SHUTDOWN_GRACE": "1"}
    async with WebhookReceiver.start(["hang", 200]) as receiver:
        async with served(tmp_path, database_url, env) as stub:
            secret = await secret_of(stub)
            job = await submit(stub, receiver.url())
            await within(receiver.received.wait_for(1))  # in flight when the server stops
        async with served(tmp_path, database_url, env) as stub:
            first, second = await within(receiver.received.wait_for(2))
            assert first.webhook_id == second.webhook_id
            verified(second, secret)
            (attempt,) = await deliveries(stub, job.name, 1)
            # The cut attempt was given back, not counted.
            assert attempt.attempt == 1 and attempt.delivered


async def test_a_cancelled_queued_job_calls_back_too(tmp_path: Path, database_url: str) -> None:
    env = {**DELIVERING, "IMAGEGEN_WORKERS": "1", "IMAGEGEN_LOCAL_STEP_DELAY": "5"}
    async with WebhookReceiver.start() as receiver, served(tmp_path, database_url, env) as stub:
        busy = await submit(stub, "")
        queued = await submit(stub, receiver.url(), request_id="queued-one")
        cancelled = await stub.CancelGeneration(
            E.CancelGenerationRequest(name=queued.name), metadata=metadata()
        )
        assert cancelled.generation.state == E.GENERATION_STATE_CANCELLED
        (received,) = await within(receiver.received.wait_for(1))
        body = received.json()
        assert body["type"] == "generation.cancelled"
        assert body["data"]["generation"]["state"] == "GENERATION_STATE_CANCELLED"
        await stub.CancelGeneration(E.CancelGenerationRequest(name=busy.name), metadata=metadata())


async def test_both_secrets_sign_during_a_rotations_grace_period(
    tmp_path: Path, database_url: str
) -> None:
    async with WebhookReceiver.start() as receiver, served(
        tmp_path, database_url, DELIVERING
    ) as stub:
        old = await secret_of(stub)
        rotated = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(request_id="rotate-1"), metadata=metadata()
        )
        new = rotated.secret.secret
        assert new != old and rotated.secret.HasField("previous_expire_time")
        grace = rotated.secret.previous_expire_time.seconds - rotated.secret.create_time.seconds
        assert 86400 - 5 <= grace <= 86400 + 5
        assert await secret_of(stub) == new

        await submit(stub, receiver.url())
        (received,) = await within(receiver.received.wait_for(1))
        signatures = received.headers["webhook-signature"].split(" ")
        assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
        # Each secret verifies it alone (a receiver on either one keeps working).
        assert verified(received, new) == verified(received, old)


async def test_after_the_grace_period_only_the_new_secret_signs(
    tmp_path: Path, database_url: str
) -> None:
    env = {**DELIVERING, "IMAGEGEN_WEBHOOK_SECRET_GRACE": "0"}
    async with WebhookReceiver.start() as receiver, served(tmp_path, database_url, env) as stub:
        old = await secret_of(stub)
        rotated = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(), metadata=metadata()
        )
        assert not rotated.secret.HasField("previous_expire_time")
        await submit(stub, receiver.url())
        (received,) = await within(receiver.received.wait_for(1))
        assert len(received.headers["webhook-signature"].split(" ")) == 1
        verified(received, rotated.secret.secret)
        with pytest.raises(WebhookVerificationError):
            verified(received, old)


async def test_secrets_are_per_user_stable_and_rotate_idempotently(
    tmp_path: Path, database_url: str
) -> None:
    async with served(tmp_path, database_url, {}) as stub:
        first = await stub.GetWebhookSecret(E.GetWebhookSecretRequest(), metadata=metadata())
        secret = first.secret.secret
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
        assert not first.secret.HasField("previous_expire_time")
        assert await secret_of(stub) == secret
        assert await secret_of(stub, "bob") != secret

        once = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(request_id="r-1"), metadata=metadata()
        )
        again = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(request_id="r-1"), metadata=metadata()
        )
        assert once.secret.secret == again.secret.secret != secret
        assert once.secret.create_time == again.secret.create_time
        # The same request_id of another user is that user's own.
        bobs = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(request_id="r-1"), metadata=metadata("bob")
        )
        assert bobs.secret.secret != once.secret.secret
        other = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(request_id="r-2"), metadata=metadata()
        )
        assert other.secret.secret not in (secret, once.secret.secret)
        assert await secret_of(stub) == other.secret.secret
        # A retry of an earlier rotation still answers what that rotation made.
        late = await stub.RotateWebhookSecret(
            E.RotateWebhookSecretRequest(request_id="r-1"), metadata=metadata()
        )
        assert late.secret.secret == once.secret.secret
        assert await secret_of(stub) == other.secret.secret

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RotateWebhookSecret(
                E.RotateWebhookSecretRequest(request_id="not ok"), metadata=metadata()
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_and_field(caught.value) == ("IMG_003", "request_id")
        assert await secret_of(stub) == other.secret.secret


async def test_secrets_are_stored_encrypted(tmp_path: Path, database_url: str) -> None:
    async with served(tmp_path, database_url, {}) as stub:
        secret = await secret_of(stub)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM webhook_secrets")
    finally:
        await conn.close()
    (row,) = rows
    stored = bytes(row["secret_ciphertext"])
    assert key not in stored and secret.encode() not in stored
    assert len(stored) == 12 + 32 + 16  # nonce, sealed key, tag


REFUSED = [
    "https://127.0.0.1/hook",
    "https://127.0.0.2:8443/hook",
    "https://[::1]/hook",
    "https://localhost/hook",
    "https://10.0.0.1/hook",
    "https://192.168.1.10/hook",
    "https://169.254.169.254/latest/meta-data",
    "https://[fd00::1]/hook",
    "https://0x7f000001/hook",
    "https://[::ffff:127.0.0.1]/hook",
]
MALFORMED = [
    "ftp://127.0.0.1/hook",
    "hook",
    "https://",
    "https://user:pw@127.0.0.1/hook",
    "https:// spaced.example/hook",
    "https://127.0.0.1:99999/hook",
    "https://example.invalid/" + "x" * 2040,
]


async def test_loopback_and_private_callbacks_are_refused_at_submit(
    tmp_path: Path, database_url: str
) -> None:
    async with served(tmp_path, database_url, {}) as stub:
        for uri in [*REFUSED, *MALFORMED, "http://127.0.0.1:9/hook"]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await submit(stub, uri)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, uri
            assert reason_and_field(caught.value) == ("IMG_003", "callback_uri"), uri
        # Nothing was made or charged.
        listed = await stub.ListGenerations(E.ListGenerationsRequest(), metadata=metadata())
        assert list(listed.generations) == []


async def test_an_allowlisted_host_is_accepted(tmp_path: Path, database_url: str) -> None:
    env = {"IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1,localhost"}
    async with served(tmp_path, database_url, env) as stub:
        for uri in ("http://127.0.0.1:9/hook", "https://localhost:9/hook?x=1"):
            job = await submit(stub, uri)
            assert job.callback_uri == uri.split("?")[0]
        # Still refused: another loopback address than the one allowed.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(stub, "https://127.0.0.2/hook")
        assert reason_and_field(caught.value) == ("IMG_003", "callback_uri")


async def test_a_retry_with_another_callback_is_another_request(
    tmp_path: Path, database_url: str
) -> None:
    env = {"IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1"}
    async with served(tmp_path, database_url, env) as stub:
        job = await submit(stub, "http://127.0.0.1:9/a", request_id="same")
        again = await submit(stub, "http://127.0.0.1:9/a", request_id="same")
        assert again.name == job.name
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(stub, "http://127.0.0.1:9/b", request_id="same")
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_and_field(caught.value)[0] == "IMG_009"


async def test_the_cli_reads_and_rotates_a_users_secret(
    tmp_path: Path, database_url: str
) -> None:
    async with serve_in_process(tmp_path, database_url) as running, grpc.aio.insecure_channel(
        f"127.0.0.1:{running.grpc_port}", options=CHANNEL_OPTIONS
    ) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        env = {
            **os.environ,
            "IMAGEGEN_ADDR": f"127.0.0.1:{running.grpc_port}",
            "IMAGEGEN_JWT_KEY": TEST_JWT_KEY,
            "IMAGEGEN_DATA_DIR": str(tmp_path / "cli"),
        }
        env.pop("IMAGEGEN_TOKEN", None)

        async def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "imagegen.cli", "webhook", "secret", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        shown = await cli("--user", "alice")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines()[-1] == await secret_of(stub, "alice")
        assert "user 'alice'" in shown.stderr

        rotated = await cli("--user", "alice", "--rotate", "--request-id", "cli-1")
        again = await cli("--user", "alice", "--rotate", "--request-id", "cli-1")
        assert rotated.returncode == again.returncode == 0, rotated.stderr + again.stderr
        new = rotated.stdout.splitlines()[-1]
        assert new == again.stdout.splitlines()[-1] != shown.stdout.splitlines()[-1]
        assert new == await secret_of(stub, "alice")
        assert "previous secret also signs until" in rotated.stderr
        assert await secret_of(stub, "bob") != new

        misuse = await cli("--user", "alice", "--request-id", "cli-2")
        assert misuse.returncode == 2 and "--rotate" in misuse.stderr
        bad = await cli("--user", "alice", "--rotate", "--request-id", "no spaces")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
        assert await secret_of(stub, "alice") == new


async def test_concurrent_first_reads_and_rotations_agree(
    tmp_path: Path, database_url: str
) -> None:
    async with served(tmp_path, database_url, {}) as stub:
        firsts = await asyncio.gather(*(secret_of(stub, "carol") for _ in range(8)))
        assert len(set(firsts)) == 1
        rotations = await asyncio.gather(
            *(
                stub.RotateWebhookSecret(E.RotateWebhookSecretRequest(), metadata=metadata("dave"))
                for _ in range(6)
            ),
            secret_of(stub, "dave"),
        )
        made = {r.secret.secret for r in rotations[:-1]}
        assert len(made) == 6
        assert await secret_of(stub, "dave") in made


async def test_the_worker_is_woken_not_polling(tmp_path: Path, database_url: str) -> None:
    """With the poll an hour apart, a job's callback still goes out when the job ends
    (the NOTIFY of its queueing wakes the worker) and its retry when its delay has passed
    (the worker sleeps until the earliest pending callback's time)."""
    async with WebhookReceiver.start([503, 200]) as receiver:
        env = {
            **DELIVERING,
            "IMAGEGEN_WEBHOOK_POLL": "3600",
            "IMAGEGEN_WEBHOOK_RETRY_DELAYS": "1",
        }
        async with served(tmp_path, database_url, env) as stub:
            job = await submit(stub, receiver.url())
            first, second = await within(receiver.received.wait_for(2))
            assert first.webhook_id == second.webhook_id
            recorded = await deliveries(stub, job.name, 2)
            assert [d.http_status for d in recorded] == [503, 200]
