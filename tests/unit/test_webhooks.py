"""Webhooks without I/O: the signature against the scheme's reference library, secrets,
the callback URL's rules, the retry schedule, sealed secrets, the body, the settings."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from imagegen.api.webhooks import render_payload
from imagegen.config import ConfigError, Settings
from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import (
    Generation,
    GenerationSpec,
    GenerationState,
    WebhookAttempt,
)
from imagegen.domain.webhooks import (
    DeliveryOutcome,
    RetryPolicy,
    WebhookEventType,
    check_callback_uri,
    decode_secret,
    encode_secret,
    event_type_for,
    new_secret_key,
    new_webhook_id,
    shown_callback_uri,
    sign,
    signed_headers,
)
from imagegen.repositories.webhook_secrets import SecretBox, SecretKeyMismatch
from imagegen.services.webhooks.delivery import WebhookEvent

KEY_TEXT = "a-deployment-key-of-at-least-32-characters"


def test_a_signature_verifies_with_the_reference_implementation() -> None:
    key = new_secret_key()
    secret = encode_secret(key)
    now = int(datetime.now(UTC).timestamp())
    body = json.dumps({"type": "generation.completed", "data": {"x": "ünï"}}).encode()
    headers = signed_headers([key], "msg_1", now, body)
    assert Webhook(secret).verify(body, headers)["type"] == "generation.completed"
    # The reference signer and ours agree byte for byte.
    assert Webhook(secret).sign("msg_1", datetime.fromtimestamp(now, UTC), body.decode()) == (
        sign(key, "msg_1", now, body)
    )
    for tampered in (
        {**headers, "webhook-id": "msg_2"},
        {**headers, "webhook-timestamp": str(now + 1)},
    ):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body, tampered)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)


def test_two_keys_give_two_signatures_each_verifying_alone() -> None:
    new, old = new_secret_key(), new_secret_key()
    now = int(datetime.now(UTC).timestamp())
    headers = signed_headers([new, old], "msg_x", now, b"{}")
    assert len(headers["webhook-signature"].split(" ")) == 2
    for key in (new, old):
        Webhook(encode_secret(key)).verify(b"{}", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(encode_secret(new_secret_key())).verify(b"{}", headers)
    with pytest.raises(ValueError):
        signed_headers([], "msg_x", now, b"{}")


def test_secrets_and_ids() -> None:
    key = new_secret_key()
    assert len(key) == 32 and key != new_secret_key()
    secret = encode_secret(key)
    assert secret.startswith("whsec_") and decode_secret(secret) == key
    for bad in ("", "whsec_", "whsec_!!!", "sk_" + base64.b64encode(key).decode()):
        with pytest.raises(ValueError):
            decode_secret(bad)
    first, second = new_webhook_id(), new_webhook_id()
    assert first.startswith("msg_") and first != second


def test_event_types() -> None:
    assert event_type_for(GenerationState.COMPLETED) is WebhookEventType.GENERATION_COMPLETED
    assert event_type_for(GenerationState.FAILED).value == "generation.failed"
    assert event_type_for(GenerationState.CANCELLED).value == "generation.cancelled"
    with pytest.raises(KeyError):
        event_type_for(GenerationState.RUNNING)


@pytest.mark.parametrize(
    "uri",
    [
        "https://hooks.example.com/in",
        "https://hooks.example.com:8443/in?token=x#frag",
        "https://[2606:4700::1]/in",
        "http://127.0.0.1:9000/hook",  # allowlisted below
        "https://example.com/" + "x" * (2048 - len("https://example.com/")),
    ],
)
def test_good_callback_uris(uri: str) -> None:
    assert check_callback_uri(uri, allow_hosts=frozenset({"127.0.0.1"})) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "http://hooks.example.com/in",  # http only for allowlisted hosts
        "ftp://hooks.example.com/in",
        "hooks.example.com/in",
        "https://",
        "https:///path",
        "https://user@hooks.example.com/",
        "https://user:pw@hooks.example.com/",
        "https://hooks.example.com:70000/",
        "https://hooks.example.com/a b",
        "https://hooks.example.com/\x00",
        "https://hooks.example.com/\u0085",
        "https://[::1/",
        "https://example.com/" + "x" * (2049 - len("https://example.com/")),
    ],
)
def test_bad_callback_uris(uri: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_callback_uri(uri, allow_hosts=frozenset())
    assert caught.value.field == "callback_uri"


def test_shown_callback_uri_drops_the_query_fragment_and_credentials() -> None:
    assert shown_callback_uri("") == ""
    assert shown_callback_uri("https://h.example/in?token=x#f") == "https://h.example/in"
    assert shown_callback_uri("https://u:p@h.example:8443/a") == "https://h.example:8443/a"
    assert shown_callback_uri("https://[::1]:9/a?b") == "https://[::1]:9/a"


def test_retry_policy() -> None:
    policy = RetryPolicy((timedelta(seconds=5), timedelta(seconds=30)), max_attempts=4)
    assert [policy.delay_after(n) for n in (1, 2, 3, 4)] == [
        timedelta(seconds=5),
        timedelta(seconds=30),
        timedelta(seconds=30),
        None,
    ]
    assert policy.total == timedelta(seconds=65)
    assert RetryPolicy((timedelta(seconds=1),), max_attempts=1).delay_after(1) is None
    for bad in ((), (timedelta(0),)):
        with pytest.raises(ValueError):
            RetryPolicy(bad, max_attempts=3)


def test_the_default_schedule_spans_about_a_day() -> None:
    webhooks = Settings.from_env({}).webhooks
    policy = RetryPolicy(webhooks.retry_delays, webhooks.max_attempts)
    assert webhooks.retry_delays[0] == timedelta(seconds=5)
    assert timedelta(hours=20) <= policy.total <= timedelta(hours=26)
    assert webhooks.secret_grace == timedelta(hours=24)


def test_delivered_means_a_2xx_answer() -> None:
    assert DeliveryOutcome(200).delivered and DeliveryOutcome(299).delivered
    assert not DeliveryOutcome(0, "refused").delivered
    assert not DeliveryOutcome(302, "a redirect").delivered
    assert not DeliveryOutcome(500, "HTTP 500").delivered


def test_a_sealed_secret_opens_only_for_its_user_version_and_key() -> None:
    box = SecretBox(KEY_TEXT)
    key = new_secret_key()
    sealed = box.seal(key, user_id="alice", version=1)
    assert key not in sealed
    assert box.open(sealed, user_id="alice", version=1, key_id=box.key_id) == key
    assert box.seal(key, user_id="alice", version=1) != sealed  # a fresh nonce each time
    with pytest.raises(SecretKeyMismatch):
        box.open(sealed, user_id="bob", version=1, key_id=box.key_id)
    with pytest.raises(SecretKeyMismatch):
        box.open(sealed, user_id="alice", version=2, key_id=box.key_id)
    other = SecretBox(KEY_TEXT + "-other")
    assert other.key_id != box.key_id
    with pytest.raises(SecretKeyMismatch, match="IMAGEGEN_WEBHOOK_KEY"):
        other.open(sealed, user_id="alice", version=1, key_id=box.key_id)
    with pytest.raises(ValueError):
        SecretBox("short")


def _generation(job_id: str, state: GenerationState) -> Generation:
    now = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    return Generation(
        id=job_id,
        user_id="alice",
        sub_account="",
        request_id="",
        spec=GenerationSpec(prompt="a fox", callback_uri="https://h.example/in?token=x"),
        state=state,
        provider="local",
        model="m",
        credits=2,
        attempts=1,
        error_code="",
        error_message="",
        created_at=now,
        updated_at=now,
        completed_at=now,
        webhook_deliveries=(
            WebhookAttempt("msg_1", 1, now, 500, "answered HTTP 500", delivered=False),
        ),
    )


def test_the_body_holds_the_generation_in_proto_json() -> None:
    job = _generation("0b7d6f0e-5d0c-4c56-9a9e-3f1b2c3d4e5f", GenerationState.COMPLETED)
    event = WebhookEvent(
        webhook_id="msg_1",
        type=WebhookEventType.GENERATION_COMPLETED,
        time=datetime(2026, 11, 25, 10, 0, 1, 500000, tzinfo=UTC),
        generations=(job,),
    )
    body = json.loads(render_payload(event, timedelta(minutes=15), usage_notice="Made with AI"))
    assert body["type"] == "generation.completed"
    assert body["timestamp"] == "2026-11-25T10:00:01.500Z"
    generation = body["data"]["generation"]
    assert generation["name"] == f"generations/{job.id}"
    assert generation["state"] == "GENERATION_STATE_COMPLETED"
    assert generation["callbackUri"] == "https://h.example/in"
    assert generation["webhookDeliveries"][0]["httpStatus"] == 500


def test_a_batch_body_holds_every_job() -> None:
    jobs = tuple(
        _generation(f"0b7d6f0e-5d0c-4c56-9a9e-3f1b2c3d4e5{n}", state)
        for n, state in enumerate((GenerationState.COMPLETED, GenerationState.FAILED))
    )
    event = WebhookEvent(
        webhook_id="msg_2",
        type=WebhookEventType.BATCH_COMPLETED,
        time=datetime(2026, 11, 25, tzinfo=UTC),
        generations=jobs,
        batch="batches/b1",
    )
    body = json.loads(render_payload(event, timedelta(minutes=15), usage_notice="Made with AI"))
    assert body["type"] == "batch.completed"
    assert body["data"]["batch"] == "batches/b1"
    assert [g["state"] for g in body["data"]["generations"]] == [
        "GENERATION_STATE_COMPLETED",
        "GENERATION_STATE_FAILED",
    ]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMAGEGEN_WEBHOOK_KEY": "short"}, "IMAGEGEN_WEBHOOK_KEY"),
        ({"IMAGEGEN_WEBHOOK_RETRY_DELAYS": "5,x"}, "IMAGEGEN_WEBHOOK_RETRY_DELAYS"),
        ({"IMAGEGEN_WEBHOOK_RETRY_DELAYS": "5,0"}, "IMAGEGEN_WEBHOOK_RETRY_DELAYS"),
        ({"IMAGEGEN_WEBHOOK_RETRY_DELAYS": ","}, "IMAGEGEN_WEBHOOK_RETRY_DELAYS"),
        ({"IMAGEGEN_WEBHOOK_TIMEOUT": "0"}, "IMAGEGEN_WEBHOOK_TIMEOUT"),
        ({"IMAGEGEN_WEBHOOK_MAX_ATTEMPTS": "0"}, "IMAGEGEN_WEBHOOK_MAX_ATTEMPTS"),
        ({"IMAGEGEN_WEBHOOK_POLL": "0"}, "IMAGEGEN_WEBHOOK_POLL"),
        ({"IMAGEGEN_WAIT_DEFAULT": "0"}, "IMAGEGEN_WAIT_DEFAULT"),
        ({"IMAGEGEN_WAIT_DEFAULT": "200"}, "IMAGEGEN_WAIT_DEFAULT"),
    ],
)
def test_bad_settings_are_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_settings() -> None:
    settings = Settings.from_env(
        {
            "IMAGEGEN_WEBHOOK_RETRY_DELAYS": "1, 2.5",
            "IMAGEGEN_WEBHOOK_MAX_ATTEMPTS": "3",
            "IMAGEGEN_WAIT_MAX": "10",
        }
    )
    assert settings.webhooks.retry_delays == (timedelta(seconds=1), timedelta(seconds=2.5))
    assert settings.webhooks.max_attempts == 3
    assert settings.wait_max == timedelta(seconds=10)
    assert settings.wait_default == timedelta(seconds=10)  # the default, cut to the max
