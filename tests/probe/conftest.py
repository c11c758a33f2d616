"""Every probe test starts without what earlier probes in the process learned."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scanner.probe import forget_learned


@pytest.fixture(autouse=True)
def fresh_probe_memory() -> Iterator[None]:
    forget_learned()
    yield
    forget_learned()
