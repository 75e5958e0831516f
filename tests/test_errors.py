"""How command-line tools end: one line on stderr and an exit code, never a traceback for the user's doing."""

from __future__ import annotations

import subprocess
import sys

from sd_lora.errors import Interrupted, UserError, run_cli


def raising(error: BaseException):
    def body():
        raise error
    return body


def test_user_errors_and_ctrl_c_end_with_one_line_and_an_exit_code(capsys):
    assert run_cli(lambda: None) == 0
    assert run_cli(raising(UserError("data/a.png: cannot decode image"))) == 2
    assert capsys.readouterr().err == "sd_lora: error: data/a.png: cannot decode image\n"
    assert run_cli(raising(Interrupted("stopped by SIGTERM", 143))) == 143
    # Ctrl-C outside training's own handling (loading, caching latents): no KeyboardInterrupt traceback.
    assert run_cli(raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err.endswith("sd_lora: interrupted (Ctrl-C); every file written so far is complete (writes are atomic)\n")


def test_a_secondary_process_holds_back_an_error_every_process_raises(capsys, monkeypatch):
    """Under `accelerate launch` every process checked the same options and printed the same error: the main
    process reports it, a secondary one waits to be ended by the launcher and prints only if it is not."""
    import time

    from sd_lora import errors

    monkeypatch.setattr(errors, "SECONDARY_GRACE_SECONDS", 0.5)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    started = time.monotonic()
    assert run_cli(raising(UserError("--data x: folder not found"))) == 2
    assert time.monotonic() - started < 0.4 and capsys.readouterr().err == "sd_lora: error: --data x: folder not found\n"

    monkeypatch.setenv("RANK", "1")
    started = time.monotonic()
    assert run_cli(raising(UserError("--data x: folder not found"))) == 2
    assert time.monotonic() - started >= 0.5 and capsys.readouterr().err == "sd_lora: error: --data x: folder not found\n"

    own = UserError("data/a.png: cannot decode image")  # found in this process's share of a batch
    own.every_process = False
    for error, code in ((own, 2), (Interrupted("stopped by a signal to another process", 143), 143)):
        started = time.monotonic()
        assert run_cli(raising(error)) == code
        assert time.monotonic() - started < 0.4 and capsys.readouterr().err == f"sd_lora: error: {error}\n"


def test_an_error_a_dataloader_worker_raised_prints_its_own_message_only(capsys):
    # With --num-workers, torch re-raises a worker's UserError with the worker's traceback as its message.
    from torch._utils import ExceptionWrapper

    def body():
        try:
            raise UserError("data/img.png: cannot be read (truncated file)\nreplace or remove it")
        except UserError:
            ExceptionWrapper(where="in DataLoader worker process 1").reraise()

    assert run_cli(body) == 2
    err = capsys.readouterr().err
    assert err == "sd_lora: error: data/img.png: cannot be read (truncated file)\nreplace or remove it\n"


def test_a_reader_that_goes_away_ends_the_tool_quietly():
    """`python -m sd_lora.inspect FILE | head`: the pipe closes while the tool still prints."""
    script = ("import sys\nfrom sd_lora.errors import run_cli\n"
              "sys.exit(run_cli(lambda: [print('module', i) for i in range(10**6)]))")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.readline() == b"module 0\n"
    child.stdout.close()  # as head does after its lines
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141
    assert stderr == "", stderr  # no BrokenPipeError traceback, nor 'Exception ignored' at exit
