"""The one error voice of every `pam-jax` command: `CLIError`, exit codes, `run_command`.

Commands raise `CLIError` (or any of the user errors: `ValueError` subclasses such as
`PromptError`, `CheckpointError`, `OSError`) for bad input; `run_command` prints it as one line
`error: ...` on stderr and returns its exit code (`EXIT_USAGE` unless the error says otherwise).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed for a reason other than its input
EXIT_USAGE = 2  # bad input or usage (argparse uses 2 too)
EXIT_INTERRUPTED = 130


class CLIError(ValueError):
    """A user-facing error: printed as `error: <message>` (one line), exit code `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


def _user_errors() -> tuple[type[BaseException], ...]:
    from pam_jax.checkpoint import CheckpointError

    # PromptError, RecordError, ... subclass ValueError; OSError covers missing / unreadable files
    return (CLIError, CheckpointError, ValueError, OSError)


def error_message(e: BaseException) -> str:
    """One line for the user: the first line of the message (OSError: its reason and file)."""
    if isinstance(e, OSError) and not isinstance(e, CLIError) and e.strerror:
        text = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    else:
        text = str(e)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def report_error(e: BaseException, stream=None) -> int:
    """Print `error: ...` for `e` and return its exit code."""
    print(f"error: {error_message(e)}", file=stream or sys.stderr)
    return e.code if isinstance(e, CLIError) else EXIT_USAGE


def run_command(fn, args: argparse.Namespace) -> int:
    """fn(args) with the one error voice: user errors -> one line on stderr + EXIT_USAGE."""
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as e:
        return report_error(e)
