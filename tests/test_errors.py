"""How command-line tools end: one line on stderr and an exit code, never a traceback for the user's doing."""

from __future__ import annotations

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
