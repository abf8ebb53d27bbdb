"""Subcommands owned by the student side."""

from __future__ import annotations

from opd_student import demo


def register(subparsers) -> None:
    demo.register(subparsers)
