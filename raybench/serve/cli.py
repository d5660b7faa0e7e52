"""`raybench deploy`: registered into the main CLI by `raybench.cli`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the serving subcommands (filled in by the serving work)."""
