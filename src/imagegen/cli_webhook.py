"""`imagegen webhook secret [--rotate] --user U`: read or rotate a user's webhook signing
secret through the server's own RPCs (GetWebhookSecret, RotateWebhookSecret)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc

from imagegen.cli_export import _whose
from imagegen.cli_generate import _token, address_of
from imagegen.client import CHANNEL_OPTIONS
from imagegen.config import Settings
from imagegen.v1 import generation_pb2, generation_pb2_grpc


def add_parser(sub: Any) -> None:
    """The `webhook` command and its actions."""
    group = sub.add_parser("webhook", help="webhook signing secrets (talks to the server)")
    actions = group.add_subparsers(dest="action", required=True)
    secret = actions.add_parser(
        "secret",
        help="print a user's whsec_ webhook signing secret (made on first use) alone on "
        "the last line of stdout",
    )
    secret.add_argument(
        "--user",
        required=True,
        help="whose secret (a token is minted for this user from the server's key); "
        "ignored when IMAGEGEN_TOKEN is set: its user's secret is used",
    )
    secret.add_argument(
        "--rotate",
        action="store_true",
        help="make a new secret; the previous one goes on signing for "
        "IMAGEGEN_WEBHOOK_SECRET_GRACE",
    )
    secret.add_argument(
        "--request-id",
        default="",
        help="with --rotate: an idempotency key (a retry with it returns the same new secret)",
    )
    secret.add_argument("--addr", default=None, help="server address (IMAGEGEN_ADDR)")


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Run `webhook secret`; returns the exit code."""
    if args.request_id and not args.rotate:
        print("imagegen: --request-id goes with --rotate", file=sys.stderr)
        return 2
    address = address_of(settings, args)
    metadata = (("authorization", f"Bearer {_token(settings, args.user)}"),)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = generation_pb2_grpc.ImageGenerationServiceStub(channel)
        try:
            if args.rotate:
                reply: Any = await stub.RotateWebhookSecret(
                    generation_pb2.RotateWebhookSecretRequest(request_id=args.request_id),
                    metadata=metadata,
                    timeout=30,
                )
            else:
                reply = await stub.GetWebhookSecret(
                    generation_pb2.GetWebhookSecretRequest(), metadata=metadata, timeout=30
                )
        except grpc.aio.AioRpcError as err:
            print(f"imagegen: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    secret: generation_pb2.WebhookSecret = reply.secret
    made = secret.create_time.ToDatetime().isoformat(timespec="seconds")
    print(
        f"imagegen: webhook secret of user {_whose(args.user)}, made {made}Z"
        + (
            "; the previous secret also signs until "
            f"{secret.previous_expire_time.ToDatetime().isoformat(timespec='seconds')}Z"
            if secret.HasField("previous_expire_time")
            else ""
        ),
        file=sys.stderr,
    )
    print(secret.secret)
    return 0
