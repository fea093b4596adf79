"""``abcctl``: the operator's command line."""

from pdp.cli.main import main

__all__ = ["main"]
