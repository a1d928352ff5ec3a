"""The `mirror` command (being split into one module per command group)."""

from mirror.cli.roles import build_parser, main, status_rows

__all__ = ["build_parser", "main", "status_rows"]
