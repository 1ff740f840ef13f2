"""Property test: no request, however malformed, ends INTERNAL or UNKNOWN.

A served process gets a fixed-seed stream of requests for every RPC of every service
(found in the generated descriptors): plausible messages that reach deep code, odd
ones (unknown enum numbers, huge and negative numbers, odd names, NUL and control
characters, 10 KB strings, out-of-range Timestamps and Durations, tampered page
tokens) and bytes that do not decode. Every call must end with a status other than
INTERNAL or UNKNOWN, every ErrorInfo reason must be an IMG code or one of the five
others the contract lists, and the server must still answer health SERVING.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import random
import re
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.v1 import common_pb2, generation_pb2, library_pb2, templates_pb2, usage_pb2

from tests.fuzzing import (
    OTHER_REASONS,
    MessageFuzzer,
    Outcome,
    Pools,
    Rpc,
    call_raw,
    discover_rpcs,
    iter_names,
)
from tests.served import ServedProcess, start_server

pytestmark = pytest.mark.e2e

#: The run is fixed by the seed; FUZZ_SEED and FUZZ_CALLS explore further by hand.
SEED = int(os.environ.get("FUZZ_SEED", "20261125"))
MIN_CALLS = int(os.environ.get("FUZZ_CALLS", "2000"))
CONCURRENCY = 8
UNARY_TIMEOUT = 30.0
#: Streams are read to their end; a watch that follows a job may legitimately run long.
STREAM_TIMEOUT = 10.0
IMG_CODE = re.compile(r"IMG_\d{3}")
#: Codes an error may end with and carry no ErrorInfo: grpc's own, not the service's.
WITHOUT_ERROR_INFO = {
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}

G, L, T, U = generation_pb2, library_pb2, templates_pb2, usage_pb2


class Caller:
    """Sends raw requests to the served process as one user (or as nobody)."""

    def __init__(self, server: ServedProcess, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.rpcs = {rpc.name: rpc for rpc in discover_rpcs()}

    def auth(self, user: str | None) -> tuple[tuple[str, str], ...]:
        return self.server.metadata(user) if user else ()

    async def call(
        self, rpc_name: str, request: bytes, user: str | None = "fuzz-alice", label: str = ""
    ) -> Outcome:
        rpc = self.rpcs[rpc_name]
        timeout = STREAM_TIMEOUT if rpc.server_streaming else UNARY_TIMEOUT
        return await call_raw(
            self.channel, rpc, request, metadata=self.auth(user), timeout=timeout, label=label
        )

    async def ok(self, rpc_name: str, request: object, user: str = "fuzz-alice") -> list[object]:
        outcome = await self.call(rpc_name, request.SerializeToString(), user)  # type: ignore[attr-defined]
        assert outcome.code == grpc.StatusCode.OK, (rpc_name, outcome.code, outcome.details)
        output = outcome.rpc.output_class()
        return [output.FromString(r) for r in outcome.responses]


def small_spec(prompt: str, **kwargs: object) -> common_pb2.GenerationSpec:
    spec = common_pb2.GenerationSpec(prompt=prompt, provider="local", **kwargs)  # type: ignore[arg-type]
    if not spec.sources:
        spec.size.CopyFrom(common_pb2.ImageSize(width=256, height=256))
    return spec


async def finished(caller: Caller, generation: str, user: str) -> G.Generation:
    """Follow a generation to its end; return it as GetGeneration shows it then."""
    await caller.ok("WatchGeneration", G.WatchGenerationRequest(name=generation), user)
    (reply,) = await caller.ok("GetGeneration", G.GetGenerationRequest(name=generation), user)
    return reply.generation  # type: ignore[attr-defined,no-any-return]


async def gather_pools(caller: Caller) -> Pools:
    """Real resources of two users and real page tokens, for mutated requests to use.
    Some of alice's images and templates are set aside for purges and deletes."""
    pools = Pools()
    names: set[str] = set()
    alice_images: list[str] = []
    variables = [
        T.TemplateVariable(name="subject", type=T.TEMPLATE_VARIABLE_TYPE_STRING, required=True),
        T.TemplateVariable(name="n", type=T.TEMPLATE_VARIABLE_TYPE_INTEGER, default_value="2"),
        T.TemplateVariable(name="flag", type=T.TEMPLATE_VARIABLE_TYPE_BOOLEAN),
    ]
    users = (
        ("fuzz-alice", ["a red fox", "two cats", "a lighthouse", "a boat", "a tree", "a cloud"], 4),
        ("fuzz-bob", ["a fox"], 1),
    )
    for user, prompts, template_count in users:
        for prompt in prompts:
            (reply,) = await caller.ok(
                "SubmitGeneration", G.SubmitGenerationRequest(spec=small_spec(prompt)), user
            )
            generation = await finished(caller, reply.generation.name, user)  # type: ignore[attr-defined]
            names.update(iter_names(generation))
            if user == "fuzz-alice":
                alice_images.extend(image.name for image in generation.images)
        template = T.PromptTemplate(
            display_name=f"{user} template",
            prompt="{{subject}} times {{n}} {{flag}}",
            category="animals",
            variables=variables,
        )
        for index in range(template_count):
            (created,) = await caller.ok(
                "CreatePromptTemplate", T.CreatePromptTemplateRequest(template=template), user
            )
            names.add(created.template.name)  # type: ignore[attr-defined]
            if user == "fuzz-alice" and index >= 2:
                pools.victims["Delete"].add(created.template.name)  # type: ignore[attr-defined]
    pools.victims["Purge"].update(alice_images[-2:])
    pools.victims["Delete"].update(alice_images[-4:-2])
    (edit,) = await caller.ok(
        "SubmitGeneration",
        G.SubmitGenerationRequest(
            spec=small_spec("invert", sources=[common_pb2.ImageSource(image=alice_images[0])])
        ),
    )
    edited = await finished(caller, edit.generation.name, "fuzz-alice")  # type: ignore[attr-defined]
    names.update(iter_names(edited))
    for name in sorted(names):
        pools.names.setdefault(name.split("/", 1)[0] + "/", []).append(name)

    for rpc_name, request in (
        ("ListImages", L.ListImagesRequest(page_size=1)),
        ("ListGenerations", G.ListGenerationsRequest(page_size=1)),
        ("ListUsage", U.ListUsageRequest(page_size=1)),
        ("ListPromptTemplates", T.ListPromptTemplatesRequest(page_size=1)),
        ("ListPromptTemplates", T.ListPromptTemplatesRequest(page_size=1, category="animals")),
    ):
        (reply,) = await caller.ok(rpc_name, request)
        token = reply.next_page_token  # type: ignore[attr-defined]
        assert token, f"{rpc_name} gave no next page token"
        pools.page_tokens.setdefault(rpc_name, []).append(token)
    return pools


def plan_calls(
    rng: random.Random, rpcs: list[Rpc], pools: Pools
) -> list[tuple[Rpc, str, bytes, str | None]]:
    """(rpc, kind, request bytes, user) for every call, from the seed alone."""
    fuzzer = MessageFuzzer(rng, pools, rpcs)
    per_rpc = math.ceil(MIN_CALLS / len(rpcs))
    plan: list[tuple[Rpc, str, bytes, str | None]] = []
    for rpc in rpcs:
        for _ in range(per_rpc):
            roll = rng.random()
            if roll < 0.25:
                kind, payload = "plausible", fuzzer.message(rpc, oddness=0.03).SerializeToString()
            elif roll < 0.65:
                kind, payload = "odd", fuzzer.message(rpc, oddness=0.5).SerializeToString()
            elif roll < 0.9:
                kind, payload = "wire", fuzzer.wire(rpc)
            else:
                kind, payload = "wild", fuzzer.message(rpc, oddness=1.0).SerializeToString()
            who = rng.random()
            user: str | None = "fuzz-alice"
            if who < 0.04:
                user = None
            elif who < 0.1:
                user = "fuzz-bob"
            plan.append((rpc, kind, payload, user))
    rng.shuffle(plan)
    return plan


def problems_of(outcome: Outcome) -> list[str]:
    """What is wrong with how one call ended (empty when nothing is)."""
    found = []
    where = f"{outcome.rpc.name} ({outcome.label})"
    if outcome.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        found.append(f"{where}: {outcome.code.name} {outcome.details!r}")
    if outcome.code == grpc.StatusCode.OK:
        output = outcome.rpc.output_class()
        for response in outcome.responses:
            output.FromString(response)  # every reply decodes as its declared type
        return found
    infos = outcome.error_infos()
    for info in infos:
        if not (IMG_CODE.fullmatch(info.reason) or info.reason in OTHER_REASONS):
            found.append(f"{where}: ErrorInfo reason {info.reason!r} is not allowed")
        if info.domain != "imagegen.v1":
            found.append(f"{where}: ErrorInfo domain {info.domain!r}")
    if not infos and outcome.code not in WITHOUT_ERROR_INFO:
        found.append(f"{where}: {outcome.code.name} without ErrorInfo ({outcome.details!r})")
    if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and not outcome.rpc.server_streaming:
        found.append(f"{where}: a unary call ran past {UNARY_TIMEOUT}s")
    if outcome.code == grpc.StatusCode.INVALID_ARGUMENT and not any(
        IMG_CODE.fullmatch(i.reason) for i in infos
    ):
        found.append(f"{where}: INVALID_ARGUMENT without an IMG code")
    return found


def server_errors(log_text: str) -> list[str]:
    """The distinct unexpected errors in a server log: where in our code each was raised
    (the innermost frame under src/imagegen), and what it was."""
    found: collections.Counter[str] = collections.Counter()
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") != "ERROR":
            continue
        trace = record.get("exception", "").strip().splitlines()
        ours = [t.strip() for t in trace if "src/imagegen" in t and t.strip().startswith("File")]
        message = re.sub(r"\(request id \w+\)", "", record.get("message", ""))[:80]
        found[f"{message} | {ours[-1] if ours else ''} | {trace[-1] if trace else ''}"] += 1
    return [f"{n} x {what}" for what, n in found.most_common()]


async def test_no_request_ends_internal_or_unknown(tmp_path: Path, database_url: str) -> None:
    server = await start_server(
        tmp_path,
        database_url,
        extra_env={"IMAGEGEN_LOCAL_STEP_DELAY": "0", "IMAGEGEN_DEFAULT_PROVIDER": "local"},
    )
    try:
        async with server.channel() as channel:
            caller = Caller(server, channel)
            pools = await gather_pools(caller)
            rpcs = discover_rpcs()
            assert {r.service for r in rpcs} >= {
                "imagegen.v1.ImageGenerationService",
                "imagegen.v1.ImageLibraryService",
                "imagegen.v1.PromptTemplateService",
                "imagegen.v1.UsageService",
            }
            plan = plan_calls(random.Random(SEED), rpcs, pools)
            assert len(plan) >= MIN_CALLS

            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(rpc: Rpc, kind: str, payload: bytes, user: str | None) -> Outcome:
                async with gate:
                    return await caller.call(rpc.name, payload, user, label=kind)

            started = time.monotonic()
            outcomes = await asyncio.gather(*(one(*entry) for entry in plan))
            elapsed = time.monotonic() - started

            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        codes = collections.Counter(o.code.name for o in outcomes)
        reasons = collections.Counter(i.reason for o in outcomes for i in o.error_infos())
        print(
            f"\nfuzz: {len(outcomes)} calls over {len(rpcs)} RPCs in {elapsed:.1f}s; "
            f"codes {dict(sorted(codes.items()))}; reasons {dict(sorted(reasons.items()))}"
        )
        per_rpc: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for o in outcomes:
            per_rpc[o.rpc.name][o.code.name] += 1
        for name, seen in sorted(per_rpc.items()):
            print(f"  {name}: {dict(sorted(seen.items()))}")
        problems = collections.Counter(p for o in outcomes for p in problems_of(o))
        assert not problems, "\n".join(
            [f"{n} x {p}" for p, n in problems.most_common(80)]
            + [f"({sum(problems.values())} problems)", "server errors:"]
            + server_errors(server.log_text())
        )
        # The plausible share gets past validation on most implemented RPCs.
        implemented = [n for n, seen in per_rpc.items() if not seen["UNIMPLEMENTED"]]
        answered = [n for n in implemented if per_rpc[n]["OK"]]
        assert len(answered) >= 0.75 * len(implemented), dict(per_rpc)
    finally:
        server.terminate()
        await server.wait_exit(30)
