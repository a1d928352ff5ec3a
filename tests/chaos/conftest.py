from tests.integration.conftest import no_leftovers, pair_name  # noqa: F401  (shared fixtures)
