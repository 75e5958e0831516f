"""Errors meant for the person running sd_lora, not for a traceback.

A `UserError` says what is wrong, with which file or value, and what to do about it. The CLI entry points
print its message and exit with status 2; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (files, options, models) that they can fix."""


class ConfigError(UserError):
    """One or more invalid options, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} configuration {noun}:\n{lines}")


class Interrupted(UserError):
    """The run stopped on SIGINT/SIGTERM after saving; `exit_code` follows the shell convention 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_cli(body: Callable[[], None]) -> int:
    """Run a command-line tool's body: 0 when it returns; a `UserError` prints one `sd_lora: error: ...` line
    on stderr (no traceback) and gives its `exit_code` (2 unless it says otherwise). A Ctrl-C that the body
    does not handle itself (training handles it once training runs) ends with one line and exit code 130."""
    try:
        body()
    except UserError as e:
        print(f"sd_lora: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("\nsd_lora: interrupted (Ctrl-C); every file written so far is complete (writes are atomic)", file=sys.stderr)
        return 130
    return 0
