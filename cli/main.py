"""Entry point of the ``gradflow`` command: one-line errors, never a traceback."""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

import typer

from gradflow.cli import commands  # noqa: F401  (registers every command on the app)
from gradflow.cli.app import app
from gradflow.errors import GradflowError
from gradflow.plugins import PluginWarning


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that files are closed on the way out.

    ``gradflow record`` handles both signals itself while it trains (it stops at the next
    step boundary); this covers the time before and after.
    """


class _Signals:
    """SIGINT and SIGTERM raise KeyboardInterrupt (:class:`Terminated` for SIGTERM) and are
    remembered: the CLI library turns a KeyboardInterrupt into a silent exit 130, which
    does not say which signal it was."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT under nohup
                    self._previous[sig] = signal.signal(sig, self._raise)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _raise(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextmanager
def _plugin_warnings() -> Iterator[None]:
    """A plug-in that fails to load is one ``gradflow: warning:`` line, like the command's
    other warnings, not Python's two lines with a source line."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, PluginWarning):
                print(f"gradflow: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = one_line
        yield


def main(argv: list[str] | None = None) -> None:
    """Run the command line and exit with its status (2 for bad input, 128 + signal when
    interrupted: 130 for SIGINT, 143 for SIGTERM)."""
    with _Signals() as signals, _plugin_warnings():
        try:
            status = app(args=argv, prog_name="gradflow", standalone_mode=False)
        except typer.TyperException as err:  # usage errors: bad option values, unknown names
            if type(err).__name__ == "NoArgsIsHelpError":  # its help is printed already
                sys.exit(2)
            print(f"gradflow: error: {_one_line(err.format_message())}", file=sys.stderr)
            sys.exit(err.exit_code)
        except typer.Abort:  # end of input at a prompt
            print("gradflow: aborted", file=sys.stderr)
            sys.exit(1)
        except GradflowError as err:
            print(f"gradflow: error: {_one_line(str(err))}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as err:
            _interrupted(signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
        except OSError as err:
            print(f"gradflow: error: {_one_line(str(err))}", file=sys.stderr)
            sys.exit(2)
    if status == 128 + signal.SIGINT and signals.received is not None:
        _interrupted(signals.received)  # a KeyboardInterrupt the CLI library turned into 130
    sys.exit(status if isinstance(status, int) else 0)


def _interrupted(signum: int) -> None:
    print("gradflow: interrupted", file=sys.stderr)
    sys.exit(128 + signum)


def _one_line(text: str) -> str:
    """The message on one line: HDF5's I/O errors carry a ctime() newline inside."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


if __name__ == "__main__":
    main()
