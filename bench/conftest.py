"""Options for the pytest-benchmark suites: `pytest bench/ --bench-ram-mib 256`."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bench-ram-mib",
        type=int,
        default=64,
        help="guest RAM size for the benchmark suites (default: 64)",
    )
