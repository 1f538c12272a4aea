from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Commands of this family are added by their own issue (see the issue tracker)."""
