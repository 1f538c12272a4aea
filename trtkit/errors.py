"""The one user-facing error type: the CLI prints it as one line and exits non-zero."""

from __future__ import annotations


class TrtkitError(Exception):
    """A problem the user can fix: bad input, missing backend, wrong shapes.

    The message is one line that says what is wrong and, where it can, what to do.
    Internal bugs are ordinary exceptions and keep their traceback.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")
