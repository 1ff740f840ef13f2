"""`imagegen usage export` and `imagegen generations export`: CSV from the server."""

from __future__ import annotations

import argparse
import asyncio
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
    if args.out == "-":
        sys.stdout.buffer.write(data)
    else:
        await asyncio.to_thread(_write, args.out, data)
        print(f"wrote {args.out} ({len(data)} bytes)", file=sys.stderr)
    return 0


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
