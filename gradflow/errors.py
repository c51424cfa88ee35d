"""The one error type gradflow raises for bad input, with close-match suggestions."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable


class GradflowError(Exception):
    """A problem with the user's input or files, explained in one line.

    The command line prints it as ``gradflow: error: <message>`` and exits with status 2,
    never with a traceback.
    """


class GradflowWarning(UserWarning):
    """Something gradflow works around at a cost the user can remove (e.g. a slow fallback)."""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> GradflowError:
    """An error for an unknown ``kind`` name that suggests the closest valid names."""
    known = sorted(choices)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listing = ", ".join(known) if len(known) <= 12 else ", ".join(known[:12]) + ", ..."
    return GradflowError(f"unknown {kind} {name!r}{hint} (known: {listing})")


def reason(err: BaseException) -> str:
    """The short reason of an error: ``File too large`` or ``No space left on device`` for
    I/O errors (not HDF5's long message around it), the message for anything else."""
    number = getattr(err, "errno", None)
    if isinstance(number, int) and number > 0:
        return os.strerror(number)
    return str(err)
