"""Webhooks across served processes: a callback whose job ended on a replica killed with
SIGKILL is sent by the next one; a delivered one is never sent again; replicas that poll
the same outbox send each callback once. The receiver is a loopback server in this
process, allowlisted explicitly; replicas share IMAGEGEN_WEBHOOK_KEY (as a deployment
must) and each has its own data directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from imagegen.v1 import common_pb2, generation_pb2
from standardwebhooks.webhooks import Webhook

from tests.fakes.webhook_receiver import WebhookReceiver
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e
E = generation_pb2
ENV = {
    "IMAGEGEN_FETCH_ALLOW_HOSTS": "127.0.0.1",
    "IMAGEGEN_WEBHOOK_KEY": "e2e-webhook-key-shared-by-every-replica-0123",
    "IMAGEGEN_WEBHOOK_POLL": "0.1",
}


def spec() -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt="a lighthouse", size=common_pb2.ImageSize(width=256, height=256)
    )


async def call(server: ServedProcess, method: str, request, user: str = "alice"):
    async with server.channel() as channel:
        return await getattr(server.stub(channel), method)(
            request, metadata=server.metadata(user), timeout=60
        )


async def recorded(server: ServedProcess, name: str) -> list[E.WebhookDelivery]:
    """The job's webhook attempts, once at least one is recorded (bounded)."""
    for _ in range(600):
        reply = await call(server, "GetGeneration", E.GetGenerationRequest(name=name))
        if reply.generation.webhook_deliveries:
            return list(reply.generation.webhook_deliveries)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no attempt recorded for {name}")


async def test_a_callback_outlives_a_kill_9_and_is_sent_once(
    tmp_path: Path, database_url: str
) -> None:
    async with WebhookReceiver.start() as receiver:
        # A's worker looks once at start and then not for an hour: the callback of its job
        # is pending when A dies.
        a = await start_server(
            tmp_path, database_url, name="a", extra_env={**ENV, "IMAGEGEN_WEBHOOK_POLL": "3600"}
        )
        try:
            secret = (await call(a, "GetWebhookSecret", E.GetWebhookSecretRequest())).secret
            job = (
                await call(
                    a,
                    "SubmitGeneration",
                    E.SubmitGenerationRequest(spec=spec(), callback_uri=receiver.url()),
                )
            ).generation
            ended = await call(a, "WaitGeneration", E.WaitGenerationRequest(name=job.name))
            assert ended.generation.state == E.GENERATION_STATE_COMPLETED
        finally:
            a.kill()
        await a.wait_exit(30)
        assert len(receiver.received) == 0

        b = await start_server(tmp_path, database_url, name="b", extra_env=ENV)
        try:
            (received,) = await asyncio.wait_for(receiver.received.wait_for(1), 60)
            body = Webhook(secret.secret).verify(received.body, received.headers)
            assert body["data"]["generation"]["name"] == job.name
            (attempt,) = await recorded(b, job.name)
            assert attempt.delivered and attempt.webhook_id == received.webhook_id
        finally:
            b.kill()
        await b.wait_exit(30)

        c = await start_server(tmp_path, database_url, name="c", extra_env=ENV)
        try:
            second = (
                await call(
                    c,
                    "SubmitGeneration",
                    E.SubmitGenerationRequest(spec=spec(), callback_uri=receiver.url()),
                )
            ).generation
            await asyncio.wait_for(receiver.received.wait_for(2), 60)
            await recorded(c, second.name)
        finally:
            c.kill()
        assert len(receiver.for_webhook(received.webhook_id)) == 1
        assert len(receiver.received) == 2


async def test_two_replicas_send_each_callback_once(tmp_path: Path, database_url: str) -> None:
    async with WebhookReceiver.start() as receiver:
        a = await start_server(tmp_path, database_url, name="a", extra_env=ENV)
        b = await start_server(tmp_path, database_url, name="b", extra_env=ENV)
        try:
            names = []
            for n, server in enumerate((a, b) * 3):
                reply = await call(
                    server,
                    "SubmitGeneration",
                    E.SubmitGenerationRequest(
                        spec=spec(), callback_uri=receiver.url(query=f"n={n}")
                    ),
                )
                names.append(reply.generation.name)
            for name in names:
                (attempt,) = await recorded(a, name)
                assert attempt.delivered
            assert len(receiver.received) == len(names)
            assert len({r.webhook_id for r in receiver.received}) == len(names)
            assert {r.json()["data"]["generation"]["name"] for r in receiver.received} == set(
                names
            )
        finally:
            a.kill()
            b.kill()
