from tests.integration.conftest import no_leftovers  # noqa: F401  (the fixture, shared)
