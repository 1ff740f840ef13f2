"""`imagegen moderation list|show|user|unsuspend` as a process against a real database."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from imagegen.cli_moderation import parse_since
from imagegen.domain.errors import ContentBlocked
from imagegen.domain.models import Identity
from imagegen.domain.moderation import ModerationPolicyTable, Purpose
from imagegen.domain.moderation_rules import RuleSet
from imagegen.providers.rules_moderation import RulesModerator
from imagegen.repositories.db import open_pool
from imagegen.repositories.moderation import ModerationRepository
from imagegen.services.moderation import ModerationService


async def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": database_url}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "imagegen.cli", "moderation", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def seed(database_url: str) -> None:
    pool = await open_pool(database_url, max_size=2)
    try:
        service = ModerationService(
            chain=[RulesModerator(RuleSet.load())],
            policies=ModerationPolicyTable.default(),
            repository=ModerationRepository(pool),
            store_text=True,
        )
        for user, prompt in (
            ("alice", "a lighthouse"),
            ("alice", "kill the dragon"),
            ("mallory", "a p0rn poster"),
        ):
            try:
                await service.check(Identity(user, "team-a"), {"prompt": prompt}, Purpose.GENERATE)
            except ContentBlocked:
                pass
        await ModerationRepository(pool).suspend("mallory", datetime.now(UTC) + timedelta(hours=1))
    finally:
        await pool.close()


async def test_operators_list_show_and_lift(database_url: str) -> None:
    await seed(database_url)
    listed = await cli(database_url, "list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()[1:]
    assert [r.split()[3] for r in rows] == ["blocked", "flagged"]  # allowed ones skipped
    assert "a p0rn poster" not in listed.stdout  # the list never prints texts
    as_json = await cli(database_url, "list", "--decision", "blocked", "--json", "--since", "1h")
    [blocked] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert blocked["user_id"] == "mallory" and blocked["categories"] == ["sexual"]
    mine = await cli(database_url, "list", "--user", "alice", "--decision", "allowed")
    assert len(mine.stdout.splitlines()) == 2
    shown = await cli(database_url, "show", blocked["id"])
    assert shown.returncode == 0, shown.stderr
    assert "decision     blocked" in shown.stdout
    assert "text         prompt: a p0rn poster" in shown.stdout  # stored: the setting was on
    assert "sha256       prompt: " in shown.stdout
    assert "user mallory: blocked 1" in shown.stdout and "suspended    until" in shown.stdout
    lifted = await cli(database_url, "unsuspend", "mallory")
    assert lifted.returncode == 0 and "lifted" in lifted.stdout
    user = await cli(database_url, "user", "mallory", "--json")
    assert json.loads(user.stdout)["suspended_until"] is None
    assert (await cli(database_url, "unsuspend", "mallory")).returncode == 1
    missing = await cli(database_url, "show", "not-an-id")
    assert missing.returncode == 1 and "no moderation decision" in missing.stderr
    bad = await cli(database_url, "list", "--since", "yesterday")
    assert bad.returncode == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", datetime(2026, 1, 1, 11, 30, tzinfo=UTC)),
        ("2d", datetime(2025, 12, 30, 12, 0, tzinfo=UTC)),
        ("2026-01-01T10:00:00", datetime(2026, 1, 1, 10, 0, tzinfo=UTC)),
        ("2026-01-01T10:00:00+02:00", datetime(2026, 1, 1, 8, 0, tzinfo=UTC)),
    ],
)
def test_since_takes_a_time_or_an_age(text: str, expected: datetime) -> None:
    assert parse_since(text, datetime(2026, 1, 1, 12, 0, tzinfo=UTC)) == expected
