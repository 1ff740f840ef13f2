"""The CLI's friendly edges: `imagegen token` never silently invents a key, exports say
whose rows they hold."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from imagegen.cli import main
from imagegen.identity import DEV_KEY_FILE


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("IMAGEGEN_JWT_KEY", "IMAGEGEN_JWT_ALGORITHMS", "IMAGEGEN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    where = tmp_path / "no-server-here"
    monkeypatch.setenv("IMAGEGEN_DATA_DIR", str(where))
    return where


def test_no_key_is_refused_saying_where_it_looked(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "--user", "alice"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert str(data_dir / DEV_KEY_FILE) in err and "IMAGEGEN_DATA_DIR" in err
    assert "--create-key" in err and len(err.strip().splitlines()) == 1
    assert not (data_dir / DEV_KEY_FILE).exists(), "no key was made"


def test_create_key_makes_one_then_it_is_reused(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "--user", "alice", "--create-key"]) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    key = (data_dir / DEV_KEY_FILE).read_text().strip()
    assert jwt.decode(first, key, algorithms=["HS256"])["sub"] == "alice"
    # The key exists now (as a server's would): no flag needed, the same key signs.
    assert main(["token", "--user", "bob"]) == 0
    second = capsys.readouterr().out.strip().splitlines()[-1]
    assert jwt.decode(second, key, algorithms=["HS256"])["sub"] == "bob"


def test_a_configured_key_needs_no_data_directory(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEGEN_JWT_KEY", "c" * 64)
    assert main(["token", "--user", "alice"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert jwt.decode(token, "c" * 64, algorithms=["HS256"])["sub"] == "alice"
    assert not data_dir.exists()


@pytest.mark.parametrize("what", ["usage", "generations"])
def test_export_help_says_whose_rows_by_default(
    what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([what, "export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "whose rows to export (default: cli" in text
