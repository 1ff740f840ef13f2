"""The allocator policy applied at start-up (IMAGEGEN_MALLOC_MMAP_THRESHOLD)."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from imagegen.api import memory
from imagegen.api.memory import apply_malloc_policy
from imagegen.config import ConfigError, Settings


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _glibc() -> ctypes.CDLL:
    # The server runs on glibc (the Dockerfile's python:3.11-slim is Debian, glibc 2.36),
    # and so does the suite: the policy is glibc's (mallopt; mallinfo2 from glibc 2.33).
    name = ctypes.util.find_library("c")
    assert name is not None, "no C library found"
    libc = ctypes.CDLL(name)
    assert hasattr(libc, "mallinfo2"), "the suite runs on glibc 2.33 or later"
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def test_the_default_threshold_is_4_mib_and_0_turns_the_policy_off() -> None:
    assert Settings.from_env({}).malloc_mmap_threshold == 4 * 1024 * 1024
    off = Settings.from_env({"IMAGEGEN_MALLOC_MMAP_THRESHOLD": "0"})
    assert off.malloc_mmap_threshold == 0
    assert apply_malloc_policy(off.malloc_mmap_threshold) is False


def test_without_glibc_the_policy_is_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    # musl or macOS: no mallopt, so nothing is tuned and the server still starts.
    monkeypatch.setattr(memory, "_libc_function", lambda _name: None)
    assert apply_malloc_policy(4 * 1024 * 1024) is False


@pytest.mark.parametrize("value", ["-1", str(32 * 1024 * 1024 + 1), "big"])
def test_a_threshold_glibc_would_not_take_is_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="IMAGEGEN_MALLOC_MMAP_THRESHOLD"):
        Settings.from_env({"IMAGEGEN_MALLOC_MMAP_THRESHOLD": value})


def test_with_the_policy_a_large_block_is_mmapped_after_a_larger_one_was_freed() -> None:
    libc = _glibc()
    assert apply_malloc_policy(4 * 1024 * 1024) is True
    # Under glibc's own policy, freeing a 24 MiB mmapped block raises the threshold to
    # 24 MiB and the next 20 MiB block comes from the heap, where it stays when freed.
    libc.free(libc.malloc(24 * 1024 * 1024))
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(20 * 1024 * 1024)
    try:
        assert libc.mallinfo2().hblkhd >= before + 20 * 1024 * 1024
    finally:
        libc.free(block)
