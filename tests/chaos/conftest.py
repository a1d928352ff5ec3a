"""Fixtures shared by the chaos suites."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.config import Config
from tests.integration.conftest import Pair, no_leftovers, pair_name  # noqa: F401  (fixtures)


@pytest.fixture
def pair_factory(
    tmp_path: Path,
    pair_name: str,  # noqa: F811
    no_leftovers: None,  # noqa: F811
) -> Iterator[object]:
    made: list[Pair] = []

    def make(base: Config) -> Pair:
        p = Pair(tmp_path, base, pair_name)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()
