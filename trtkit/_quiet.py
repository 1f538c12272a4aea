"""One way to load diffusers/transformers models quietly: no progress bars, advice or warnings.

The CLI prints one line per step; the libraries' own chatter would bury it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    import diffusers.utils.logging as dlog

    level, bar = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        from transformers.utils import logging as tlog

        tlevel, tbar = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        tlog = None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(level)
        if bar:
            dlog.enable_progress_bar()
        if tlog is not None:
            tlog.set_verbosity(tlevel)
            if tbar:
                tlog.enable_progress_bar()
