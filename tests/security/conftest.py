"""Fixtures of the security suites: real hosts, as in tests/integration."""

from tests.integration.conftest import no_leftovers, pair, pair_name  # noqa: F401  (fixtures)
