"""Entry point of the ``gradflow`` command: one-line errors, never a traceback."""

from __future__ import annotations

import sys

import click

from gradflow.cli.app import app
from gradflow.errors import GradflowError


def _load_commands() -> None:
    # Each module adds its commands to `app` on import.
    from gradflow.cli import commands  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns (and exits with) the process status."""
    _load_commands()
    try:
        app(args=argv, standalone_mode=False, prog_name="gradflow")
    except GradflowError as err:
        print(f"gradflow: error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Abort:
        print("gradflow: aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("gradflow: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        print(f"gradflow: error: {err}", file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    main()
