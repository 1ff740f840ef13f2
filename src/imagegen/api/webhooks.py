"""The body of a callback: the Generation as the API shows it, in proto JSON form.

    {"type": "generation.completed",          (generation.failed, generation.cancelled;
                                               batch.completed for a batch)
     "timestamp": "2026-11-25T10:00:00.123Z", (when the job, or the batch, ended)
     "data": {"generation": {...}}}           (a batch: {"batch": "batches/...",
                                               "generations": [{...}, ...]})

`data.generation` is what GetGeneration answers at the time of the attempt (fresh image
URLs, the webhook's attempts so far), with proto JSON's lowerCamelCase names.
"""

from __future__ import annotations

import json
from datetime import UTC, timedelta
from typing import Any

from google.protobuf import json_format

from imagegen.api.convert import generation_to_proto
from imagegen.services.webhooks.delivery import WebhookEvent


def render_payload(event: WebhookEvent, url_ttl: timedelta, *, usage_notice: str) -> bytes:
    """The callback's body, compact UTF-8 JSON; each generation carries the deployment's
    usage notice as GetGeneration would."""
    generations = [
        json_format.MessageToDict(generation_to_proto(g, url_ttl, usage_notice=usage_notice))
        for g in event.generations
    ]
    data: dict[str, Any]
    if event.batch:
        data = {"batch": event.batch, "generations": generations}
    else:
        (generation,) = generations
        data = {"generation": generation}
    stamp = event.time.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = {"type": event.type.value, "timestamp": stamp, "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
