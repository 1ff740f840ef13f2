"""`imagegen usage export` and `imagegen generations export`: CSV from the server."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from imagegen.cli_generate import _token
from imagegen.client import CHANNEL_OPTIONS
from imagegen.config import Settings
from imagegen.v1 import usage_pb2, usage_pb2_grpc


def _stamp(text: str | None) -> Timestamp | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def run_export(settings: Settings, args: argparse.Namespace, what: str) -> int:
    address = args.addr or os.environ.get("IMAGEGEN_ADDR") or f"127.0.0.1:{settings.grpc_port}"
    metadata = (("authorization", f"Bearer {_token(settings, args.user)}"),)
    window: dict[str, Any] = {}
    for field, value in (("start_time", _stamp(args.start)), ("end_time", _stamp(args.end))):
        if value is not None:
            window[field] = value
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub: Any = usage_pb2_grpc.UsageServiceStub(channel)
        if what == "usage":
            call = stub.ExportUsage(usage_pb2.ExportUsageRequest(**window), metadata=metadata)
        else:
            call = stub.ExportGenerations(
                usage_pb2.ExportGenerationsRequest(**window), metadata=metadata
            )
        chunks: list[bytes] = []
        try:
            async for reply in call:
                chunks.append(reply.data)
        except grpc.aio.AioRpcError as err:
            print(f"imagegen: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    data = b"".join(chunks)
    whose = f"{what} of user {_whose(args.user)}"
    if args.out == "-":
        sys.stdout.buffer.write(data)
        print(f"imagegen: exported {whose}", file=sys.stderr)
    else:
        await asyncio.to_thread(_write, args.out, data)
        print(f"wrote {args.out} ({len(data)} bytes): {whose}", file=sys.stderr)
    return 0


def _whose(user: str) -> str:
    """The user whose rows the server returned: IMAGEGEN_TOKEN's `sub`, else --user."""
    token = os.environ.get("IMAGEGEN_TOKEN")
    if not token:
        return repr(user)
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return repr(str(claims["sub"]))
    except (IndexError, ValueError, KeyError, TypeError):
        return "named in IMAGEGEN_TOKEN"


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
