"""Detector backends, registered by name: `detector.backend` picks one, and its settings are
the `DetectorConfig` section of the same name.

Adding a backend: a module here with a `Backend` subclass (`base.py` says what it provides),
one `register(...)` line below, and its settings section in `linewatch/config.py` (a
`BackendSection` subclass, a `DetectorConfig` field named like the backend, the name in the
`backend` Literal) with its keys in configs/reference.yaml. Nothing else names backends: the
models, the bank builder, the Inspector, the fingerprint and the labels go through here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from linewatch.detector.backends.base import Backend, Models, area_filter, build_dcga
from linewatch.detector.backends.classic import ClassicBackend
from linewatch.detector.backends.samlad import SamLadBackend

__all__ = ["BACKENDS", "BACKEND_LABELS", "Backend", "Models", "area_filter", "build_dcga", "get_backend", "register"]

BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Make `backend` available under `backend.name`."""
    if backend.name in BACKENDS:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown detector backend {name!r}; registered: {', '.join(sorted(BACKENDS))}") from None


class _Labels(Mapping[str, str]):
    """backend name -> label, read from the registry at each lookup."""

    def __getitem__(self, name: str) -> str:
        return BACKENDS[name].label

    def __iter__(self) -> Iterator[str]:
        return iter(BACKENDS)

    def __len__(self) -> int:
        return len(BACKENDS)


BACKEND_LABELS: Mapping[str, str] = _Labels()

register(ClassicBackend())
register(SamLadBackend())
