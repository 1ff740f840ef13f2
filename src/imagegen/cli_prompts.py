"""`imagegen suggest` and `imagegen enhance`: the prompt assistant from the command line,
through the Python client (imagegen.client)."""

from __future__ import annotations

import argparse
import sys

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagegen.cli_generate import _token, address_of
from imagegen.client import ImageGenClient
from imagegen.config import Settings


def _refused(err: grpc.aio.AioRpcError) -> int:
    reason = ""
    status = rpc_status.from_call(err)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    print(
        f"imagegen: {err.code().name} {reason}: {err.details()}".replace("  ", " "), file=sys.stderr
    )
    return 1


async def run_suggest(settings: Settings, args: argparse.Namespace) -> int:
    """Print one suggestion a line, best first: its source, then its text (a template's
    name after it)."""
    async with ImageGenClient(
        address_of(settings, args), _token(settings, args.user), timeout=30
    ) as client:
        try:
            found = await client.suggest_prompts(
                args.text, style=args.style or "", limit=args.limit
            )
        except grpc.aio.AioRpcError as err:
            return _refused(err)
    for suggestion in found:
        template = f"  ({suggestion.template})" if suggestion.template else ""
        print(f"{suggestion.source:<8} {suggestion.text}{template}")
    if not found:
        print("imagegen: no suggestions", file=sys.stderr)
    return 0


async def run_enhance(settings: Settings, args: argparse.Namespace) -> int:
    """Print the richer prompt on its own line, then the negative prompt and what made it."""
    async with ImageGenClient(
        address_of(settings, args), _token(settings, args.user), timeout=120
    ) as client:
        try:
            enhanced = await client.enhance_prompt(args.prompt, style=args.style or "")
        except grpc.aio.AioRpcError as err:
            return _refused(err)
    print(enhanced.prompt)
    print(f"negative: {enhanced.negative_prompt}")
    print(f"enhancer: {enhanced.enhancer}, {enhanced.credits} credits", file=sys.stderr)
    return 0
