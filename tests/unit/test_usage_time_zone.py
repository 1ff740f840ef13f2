"""A time zone Python knows but the database does not is the caller's error (IMG_003 on
`time_zone`), decided by the service: the repository only reports what happened."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from imagegen.domain.errors import InvalidRequest
from imagegen.domain.models import Identity
from imagegen.domain.plans import PlanTable
from imagegen.repositories.usage import UnknownTimeZone, UsageQueries
from imagegen.services.usage import UsageService


class _QueriesWithoutTheZone:
    async def totals(self, *args: Any) -> Any:
        raise UnknownTimeZone(args[-1])


async def test_a_zone_the_database_lacks_is_invalid_argument_on_time_zone() -> None:
    service = UsageService(
        cast(UsageQueries, _QueriesWithoutTheZone()), cast(Any, None), PlanTable.default()
    )
    start = datetime(2026, 11, 1, tzinfo=UTC)
    with pytest.raises(InvalidRequest) as raised:
        await service.stats(Identity("alice"), start, datetime(2026, 11, 2, tzinfo=UTC), "UTC")
    assert raised.value.field == "time_zone"
    assert "UTC" in str(raised.value)
