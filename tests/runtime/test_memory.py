"""limit_malloc_arenas: glibc's arenas capped unless the environment says otherwise."""

from __future__ import annotations

import platform

import pytest

from linewatch.runtime.ops.memory import limit_malloc_arenas


def test_the_environment_decides_when_it_sets_malloc_arena_max(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_glibc_takes_the_cap(monkeypatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas() is True
