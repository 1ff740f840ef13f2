"""The deployment files and the container's start-up notices."""

from __future__ import annotations

from imagegen.server import public_url_notice


def test_public_url_notice_when_every_interface_is_bound_without_a_public_url() -> None:
    notice = public_url_notice("0.0.0.0", None, 8088)
    assert notice is not None
    assert "IMAGEGEN_PUBLIC_URL" in notice and "http://127.0.0.1:8088" in notice
    assert public_url_notice("::", None, 8088) is not None


def test_no_public_url_notice_when_it_is_set_or_the_host_is_specific() -> None:
    assert public_url_notice("0.0.0.0", "https://images.example.test", 8088) is None
    assert public_url_notice("127.0.0.1", None, 8088) is None
    assert public_url_notice("10.1.2.3", None, 8088) is None
