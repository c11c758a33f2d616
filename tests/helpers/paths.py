"""Where the tests find the repository and their fixtures, whichever folder they live in."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
CALICO = FIXTURES / "calico"
