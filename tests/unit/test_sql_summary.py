"""Database span names: the query summaries of OpenTelemetry's database conventions,
made from the SQL our repositories send."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from imagegen.repositories.db import QuerySummary, summarize_sql

REPOSITORIES = Path(__file__).resolve().parents[2] / "src" / "imagegen" / "repositories"


@pytest.mark.parametrize(
    ("sql", "summary"),
    [
        (
            "SELECT * FROM generations WHERE id = $1",
            QuerySummary("SELECT generations", "SELECT", "generations"),
        ),
        (
            "INSERT INTO images (id, user_id) VALUES ($1, $2) RETURNING *",
            QuerySummary("INSERT images", "INSERT", "images"),
        ),
        (
            "UPDATE generations SET state = 'queued' WHERE id = $1",
            QuerySummary("UPDATE generations", "UPDATE", "generations"),
        ),
        (
            "DELETE FROM images WHERE id = $1 RETURNING *",
            QuerySummary("DELETE images", "DELETE", "images"),
        ),
        # Transactions and commands: the command itself.
        ("BEGIN;", QuerySummary("BEGIN", "BEGIN", None)),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE;", QuerySummary("BEGIN", "BEGIN", None)),
        ("COMMIT;", QuerySummary("COMMIT", "COMMIT", None)),
        ("SELECT pg_notify($1, $2)", QuerySummary("SELECT", "SELECT", None)),
        # FROM inside a function call is not a table.
        (
            "SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0) "
            "FROM generations WHERE state = 'queued'",
            QuerySummary("SELECT generations", "SELECT", "generations"),
        ),
        # Row locks and upserts are not operations of their own.
        (
            "SELECT * FROM generations WHERE id = $1 FOR UPDATE",
            QuerySummary("SELECT generations", "SELECT", "generations"),
        ),
        (
            "SELECT * FROM generations WHERE id = $1 FOR NO KEY UPDATE SKIP LOCKED",
            QuerySummary("SELECT generations", "SELECT", "generations"),
        ),
        (
            "INSERT INTO user_settings (user_id, v) VALUES ($1, $2) "
            "ON CONFLICT (user_id) DO UPDATE SET v = excluded.v",
            QuerySummary("INSERT user_settings", "INSERT", "user_settings"),
        ),
        # Several tables: each in order, and no single collection.
        (
            "SELECT i.* FROM images i JOIN image_parents p ON p.image_id = i.id",
            QuerySummary("SELECT images image_parents", "SELECT", None),
        ),
        (
            "SELECT * FROM images a, image_parents AS b WHERE a.id = b.image_id",
            QuerySummary("SELECT images image_parents", "SELECT", None),
        ),
        (
            "SELECT * FROM images WHERE id = ANY(SELECT parent_id FROM image_parents)",
            QuerySummary("SELECT images SELECT image_parents", "SELECT", None),
        ),
        # Several operations: no single operation name; WITH names are not tables.
        (
            "WITH claimed AS (SELECT id FROM generations WHERE state = 'queued' "
            "FOR UPDATE SKIP LOCKED LIMIT $1) UPDATE generations g SET state = 'running' "
            "FROM claimed WHERE g.id = claimed.id RETURNING g.*",
            QuerySummary("SELECT generations UPDATE generations", None, "generations"),
        ),
        (
            "INSERT INTO credit_ledger (user_id) SELECT user_id FROM generations WHERE id = $1",
            QuerySummary("INSERT credit_ledger SELECT generations", None, None),
        ),
        # Literals, comments and quoted names.
        (
            "/* why */ SELECT 1 FROM \"Odd\".\"T\" WHERE x = 'FROM nowhere' -- tail",
            QuerySummary('SELECT "Odd"."T"', "SELECT", '"Odd"."T"'),
        ),
        (
            "SELECT * FROM public.images WHERE note = $$it's FROM here$$",
            QuerySummary("SELECT public.images", "SELECT", "public.images"),
        ),
        ("SELECT x FROM unnest($1::text[]) AS u(x)", QuerySummary("SELECT", "SELECT", None)),
        ("", QuerySummary("postgresql", None, None)),
    ],
)
def test_summaries(sql: str, summary: QuerySummary) -> None:
    assert summarize_sql(sql) == summary


def _repository_statements() -> list[str]:
    statements = []
    for path in sorted(REPOSITORIES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                # Whole statements, as the repositories write them (keywords in capitals).
                words = node.value.split(None, 1)
                if len(words) == 2 and words[0] in ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH"):
                    statements.append(node.value)
    return statements


def test_every_repository_statement_has_a_summary_that_names_no_value() -> None:
    statements = _repository_statements()
    assert len(statements) > 40
    for sql in statements:
        summary = summarize_sql(sql)
        assert summary.text.split()[0] in ("SELECT", "INSERT", "UPDATE", "DELETE"), sql
        # Only keywords and names: never a literal or a parameter.
        assert not any(c in summary.text for c in "'$()=,"), (summary.text, sql)
