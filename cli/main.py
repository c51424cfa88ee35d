"""Entry point of the ``gradflow`` command: one-line errors, never a traceback."""

from __future__ import annotations

import sys

from gradflow.cli import commands  # noqa: F401  (registers every command on the app)
from gradflow.cli.app import app
from gradflow.errors import GradflowError


def main(argv: list[str] | None = None) -> None:
    """Run the command line and exit with its status (2 for bad input)."""
    try:
        # Standalone mode: the CLI library reports its own usage errors and exits 2.
        app(args=argv, prog_name="gradflow")
    except GradflowError as err:
        print(f"gradflow: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gradflow: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        print(f"gradflow: error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)


def _one_line(err: BaseException) -> str:
    """The message on one line: HDF5's I/O errors carry a ctime() newline inside."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


if __name__ == "__main__":
    main()
