"""Errors meant for the person running sd_lora, not for a traceback.

A `UserError` says what is wrong, with which file or value, and what to do about it. The CLI entry points
print its message and exit with status 2; anything else is our bug and keeps its traceback.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Callable

# How long a secondary process of a multi-process run holds back an error that every process raises, waiting
# for the launcher to end it once the main process has reported the same error (`run_cli`).
SECONDARY_GRACE_SECONDS = 20.0


class UserError(Exception):
    """A problem with the user's input (files, options, models) that they can fix."""

    # Whether every process of a multi-process run raises this same error: the options, files and model are
    # checked the same way in each, so only the main process reports it (`run_cli`). False for what one process
    # finds alone, such as an image that fails to load in its share of a batch: that process reports it.
    every_process = True


class ConfigError(UserError):
    """One or more invalid options, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{len(self.problems)} configuration {noun}:\n{lines}")


class Interrupted(UserError):
    """The run stopped on SIGINT/SIGTERM after saving; `exit_code` follows the shell convention 128 + signal."""

    every_process = False  # each process says how it stopped (by its own signal or another process's)

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def is_secondary_process() -> bool:
    """Whether this is a process of a multi-process launch (`accelerate launch`, torchrun) other than the main
    one (global rank 0), read from the launcher's environment."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


_WORKER_WRAPPED = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def user_message(error: UserError) -> str:
    """The message of `error`; for one a DataLoader worker raised (torch re-raises it in the main process with the
    worker's whole traceback as its message: `--num-workers`), the original message only."""
    text = str(error)
    marker = f"\n{type(error).__module__}.{type(error).__qualname__}: "
    if _WORKER_WRAPPED.match(text) and marker in text:
        return text.rsplit(marker, 1)[1].rstrip("\n")
    return text


def run_cli(body: Callable[[], None]) -> int:
    """Run a command-line tool's body: 0 when it returns; a `UserError` prints one `sd_lora: error: ...` line
    on stderr (no traceback) and gives its `exit_code` (2 unless it says otherwise). A Ctrl-C that the body
    does not handle itself (training handles it once training runs) ends with one line and exit code 130.

    In a multi-process run an error that every process raises (`UserError.every_process`) is printed once, by
    the main process: the others hold it back until the launcher, seeing the main process fail, ends them. One
    still running after `SECONDARY_GRACE_SECONDS` prints it after all (the main process did not fail the same
    way, or not yet), so an error is never lost; the sleep also keeps a secondary process that got ahead from
    exiting first, which would make the launcher end the main process before it prints."""
    try:
        body()
    except UserError as e:
        if e.every_process and is_secondary_process():
            time.sleep(SECONDARY_GRACE_SECONDS)
        print(f"sd_lora: error: {user_message(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("\nsd_lora: interrupted (Ctrl-C); every file written so far is complete (writes are atomic)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`... | head`): end quietly, as a shell tool does
        _discard_stdout()
        return 141  # 128 + SIGPIPE (13), what a shell reports for a tool its pipe ended
    return 0


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit does not raise the broken pipe again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor (a test's captured stdout)
        pass
