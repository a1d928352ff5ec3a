"""Fixtures of the security suites: the integration suites' real pairs, and strangers."""

from __future__ import annotations

from tests.integration.conftest import no_leftovers, pair, pair_name  # noqa: F401  (fixtures)
