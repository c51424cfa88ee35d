"""Entry point of the ``gradflow`` command: one-line errors, never a traceback."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from gradflow.cli import commands  # noqa: F401  (registers every command on the app)
from gradflow.cli.app import app
from gradflow.errors import GradflowError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that files are closed on the way out.

    ``gradflow record`` handles both signals itself while it trains (it stops at the next
    step boundary); this covers the time before and after.
    """


def main(argv: list[str] | None = None) -> None:
    """Run the command line and exit with its status (2 for bad input, 128 + signal when
    interrupted: 130 for SIGINT, 143 for SIGTERM)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        # Standalone mode: the CLI library reports its own usage errors and exits 2.
        app(args=argv, prog_name="gradflow")
    except GradflowError as err:
        print(f"gradflow: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print("gradflow: interrupted", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT))
    except OSError as err:
        print(f"gradflow: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _one_line(err: BaseException) -> str:
    """The message on one line: HDF5's I/O errors carry a ctime() newline inside."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


if __name__ == "__main__":
    main()
