"""The run's hooks: the common stop decision of several processes, the grids' names, epoch saves and grids,
--keep-saves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

# One rank of a 2-process gloo group: vote six times, asking to stop from vote `ask_from` on (a signal's
# flag stays set), and write the decisions.
VOTER = """
import json, sys
import torch, torch.distributed as dist
from sd_lora.outputs import StopVote
rank, ask_from, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
vote = StopVote(torch.device("cpu"))
decisions = [vote(ask_from >= 0 and i >= ask_from) for i in range(6)]
dist.destroy_process_group()
open(out, "w").write(json.dumps(decisions))
"""


@pytest.mark.slow
@pytest.mark.parametrize("asks", [(-1, 2), (4, 1), (-1, -1)])
def test_processes_stop_together_one_step_after_the_first_request(tmp_path, asks):
    procs = [subprocess.Popen([sys.executable, "-c", VOTER, str(rank), str(ask_from), str(tmp_path / "store"), str(tmp_path / f"{rank}.json")])
             for rank, ask_from in enumerate(asks)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    decisions = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    first = min((a for a in asks if a >= 0), default=None)
    expected = [first is not None and i > first for i in range(6)]  # the vote of step i is read at step i + 1
    assert decisions == [expected, expected]


def test_readme_names_every_file_the_sample_hooks_write():
    """The README's table of outputs lists the grids `RunOutputs.sample` and `compare_with_base` write."""
    import inspect
    import re
    from pathlib import Path

    from sd_lora.outputs import RunOutputs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for hook in (RunOutputs.sample, RunOutputs.compare_with_base):
        (suffix,) = re.findall(r'name\}(-[a-z-]*step)\{step:08d\}\.png', inspect.getsource(hook))
        assert f"| `out/samples/<name>{suffix}NNNNNNNN.png` |" in readme, suffix
    assert re.findall(r'name\}-\{epoch:06d\}\.png', inspect.getsource(RunOutputs.sample))  # the epoch grids
    assert "| `out/samples/<name>-NNNNNN.png` |" in readme


@pytest.mark.slow
def test_grids_draw_the_prompt_files_sizes_and_seeds_and_record_them(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    """A prompt file's --w/--h/--d/--s/--l/--ss reach the grid the run writes, and the PNG records what was drawn;
    the base-vs-LoRA grid's rows say so too (its columns are headed with the settings' seeds)."""
    from PIL import Image

    from sd_lora import outputs
    from sd_lora.config import load_config
    from sd_lora.train import run

    compared = []
    side_by_side = outputs.side_by_side_grid
    monkeypatch.setattr(outputs, "side_by_side_grid", lambda *a, **k: compared.append(a[2]) or side_by_side(*a, **k))

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two rows\nzkchar --d 40\n\nzkchar, tall --w 16 --h 48 --s 3 --l 2 --n blurry --ss k_euler_a\n", encoding="utf-8")
    out = tmp_path / "out"
    run(load_config(["--data", str(tiny_dataset), "--model", str(tiny_model_dir), "--output-dir", str(out),
                     "--resolution", "32", "--batch-size", "2", "--rank", "4", "--max-steps", "1", "--sample-every", "1",
                     "--sample-steps", "2", "--sample-seeds", "2", "--sample-prompts", str(prompts), "--output-name", "zk"]))
    with Image.open(out / "samples" / "zk-step00000001.png") as grid:
        log = json.loads(grid.text["sd_lora"])
        # grid.py's layout: slot 32x48 (widest, tallest cell) scaled x3 to 96x144, font 12 so the label column is
        # 120 wide and the title and header rows 27 high; two seed columns, two prompt rows
        assert grid.size == (120 + 2 * (96 + 4) + 4, 27 + 27 + 2 * (144 + 4))
    assert log["step"] == 1 and log["sampler"] == "ddim" and log["seeds"] == [0, 1]
    assert log["rows"] == [
        {"prompt": "zkchar", "negative": "", "width": 32, "height": 32, "steps": 2, "cfg": 7.5, "seeds": [40, 41], "sampler": "ddim"},
        {"prompt": "zkchar, tall", "negative": "blurry", "width": 16, "height": 48, "steps": 3, "cfg": 2.0, "seeds": [0, 1],
         "sampler": "k_euler_a"},
    ]
    assert compared == [["zkchar [seeds 40, 41]", "zkchar, tall [16x48; 3 steps; cfg 2; k_euler_a]"]]


# --- epoch saves and grids, --keep-saves ----------------------------------------------------------------
# The tiny dataset: 6 images x 2 repeats / batch 2 = 6 batches; with accumulation 3 an epoch is 2 steps, so
# epoch e ends at step 2e.
EPOCHS = ["--resolution", "32", "--batch-size", "2", "--gradient-accumulation-steps", "3", "--rank", "4", "--sample-steps", "2",
          "--sample-seeds", "1", "--output-name", "zk"]


def epoch_args(data, model, out, *extra):
    return ["--data", str(data), "--model", str(model), "--output-dir", str(out), *EPOCHS, *extra]


def record_writes(monkeypatch) -> list[str]:
    """The names of the LoRA files the run writes, in order."""
    from sd_lora.outputs import RunOutputs

    names, original = [], RunOutputs._write_lora

    def write(self, path, state):
        names.append(path.name)
        return original(self, path, state)

    monkeypatch.setattr(RunOutputs, "_write_lora", write)
    return names


@pytest.mark.slow
def test_epoch_files_and_grids_at_the_right_epochs_and_keep_saves_deletes_only_the_oldest(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    from PIL import Image
    from safetensors import safe_open

    from sd_lora import outputs
    from sd_lora.config import load_config
    from sd_lora.train import run

    out = tmp_path / "out"
    out.mkdir()
    # Not this run's: an unrelated file, another output name's epoch file, and an older run's step file under
    # this run's naming (a step this run never saves).
    strangers = {"notes.safetensors": b"n", "other-000001.safetensors": b"o", "zk-step00000005.safetensors": b"z"}
    for name, content in strangers.items():
        (out / name).write_bytes(content)
    written = record_writes(monkeypatch)
    drawn, original_grid = [], outputs.generate_grid

    def counting_grid(*args, **kwargs):
        drawn.append(kwargs["title"])
        return original_grid(*args, **kwargs)

    monkeypatch.setattr(outputs, "generate_grid", counting_grid)
    # 8 steps = 4 epochs; the 4th ends at the last step, whose weights are the final file.
    run(load_config(epoch_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "8", "--save-every", "3", "--save-every-epochs", "1",
                               "--keep-saves", "3", "--sample-every", "4", "--sample-every-epochs", "2")))
    assert written == ["zk-000001.safetensors", "zk-step00000003.safetensors", "zk-000002.safetensors", "zk-step00000006.safetensors",
                       "zk-000003.safetensors", "zk.safetensors"]  # no zk-000004: the last epoch is zk.safetensors
    # The newest 3 intermediate files stay; the two oldest went; nothing else was touched.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        ["zk-000002.safetensors", "zk-000003.safetensors", "zk-step00000006.safetensors", "zk.safetensors", *strangers])
    assert all((out / name).read_bytes() == content for name, content in strangers.items())
    with safe_open(str(out / "zk-000002.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_epoch"], meta["ss_steps"]) == ("2", "4")
    # Grids: step 0, step 4 = end of epoch 2 (drawn once, saved under both names), the end (not also as epoch 4).
    grids = sorted(p.name for p in (out / "samples").iterdir())
    assert grids == ["zk-000002.png", "zk-compare-step00000008.png", "zk-step00000000.png", "zk-step00000004.png", "zk-step00000008.png"]
    assert drawn == ["zk - step 0", "zk - step 4, end of epoch 2", "zk - step 8"]
    with Image.open(out / "samples" / "zk-000002.png") as by_epoch, Image.open(out / "samples" / "zk-step00000004.png") as by_step:
        assert json.loads(by_epoch.text["sd_lora"])["epoch"] == 2 and json.loads(by_epoch.text["sd_lora"])["step"] == 4
        assert by_epoch.tobytes() == by_step.tobytes()


@pytest.mark.slow
def test_a_resumed_run_saves_no_epoch_twice_and_keeps_deleting_its_own_older_files(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch):
    from sd_lora import outputs
    from sd_lora.config import load_config
    from sd_lora.errors import Interrupted
    from sd_lora.train import run

    out = tmp_path / "out"
    args = epoch_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "8", "--save-every-epochs", "1", "--keep-saves", "2", "--sample-every", "0")
    original = outputs.RunOutputs.on_step_end

    def stop_at_step_4(self, state):  # the end of epoch 2: its file is written, then the run stops
        original(self, state)
        if state.step == 4:
            self.stop.signal = signal.SIGINT

    monkeypatch.setattr(outputs.RunOutputs, "on_step_end", stop_at_step_4)
    with pytest.raises(Interrupted):
        run(load_config(args))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["zk-000001.safetensors", "zk-000002.safetensors", "zk-step00000004.safetensors"]
    monkeypatch.undo()
    written = record_writes(monkeypatch)
    run(load_config([*args, "--resume", "latest"]))
    assert written == ["zk-000003.safetensors", "zk.safetensors"]  # epoch 2 was saved before the stop
    # --keep-saves 2 deleted epoch 1's file, written before the interruption; the Ctrl-C save is not a scheduled one.
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "zk-000002.safetensors", "zk-000003.safetensors", "zk-step00000004.safetensors", "zk.safetensors"]


@pytest.mark.parametrize("flags, message", [
    (["--save-every-epochs", "-1"], "--save-every-epochs -1 is out of range: it must be >= 0"),
    (["--sample-every-epochs", "two"], "command line: sample-every-epochs = 'two' must be a whole number"),
    (["--keep-saves", "-2", "--save-every", "5"], "--keep-saves -2 is out of range: it must be >= 0"),
    (["--keep-saves", "2"], "--keep-saves 2 keeps the newest intermediate files, but none are saved; add --save-every N or --save-every-epochs N"),
])
def test_bad_epoch_and_keep_options_are_refused(tiny_dataset, tmp_path, flags, message):
    from sd_lora.config import load_config
    from sd_lora.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(["--data", str(tiny_dataset), "--output-dir", str(tmp_path), *flags])
    assert message in str(e.value)


@pytest.mark.parametrize("every, total, refused", [(3, 8, None), (4, 8, "use 1 to 3"), (4, 9, None), (1, 2, "train more than one epoch")])
def test_epoch_schedules_that_never_reach_an_epoch_before_the_last_are_refused(every, total, refused):
    """Epoch e ends at step 2e: with 8 steps epochs 1-3 end before the last step, epoch 4 at it (the final file)."""
    from sd_lora.errors import UserError
    from sd_lora.options import TrainConfig
    from sd_lora.preflight import check_epoch_schedules

    for option in ("save_every_epochs", "sample_every_epochs"):
        config = TrainConfig(output_name="zk", **{option: every})
        if refused is None:
            check_epoch_schedules(config, steps_per_epoch=2, total_steps=total)
            continue
        with pytest.raises(UserError) as e:
            check_epoch_schedules(config, steps_per_epoch=2, total_steps=total)
        assert f"--{option.replace('_', '-')} {every}: the run has {total} steps, 2 per epoch" in str(e.value) and refused in str(e.value)


def test_a_non_finite_validation_loss_is_logged_but_never_the_best(monkeypatch):
    from types import SimpleNamespace

    from sd_lora import outputs

    losses = iter([float("nan"), 0.5, float("inf"), 0.25])
    monkeypatch.setattr(outputs, "validation_loss", lambda *args: next(losses))
    logged = []
    hooks = SimpleNamespace(trainee=None, objective=None, validation_items=[], config=SimpleNamespace(batch_size=1),
                            best_validation=None, best_validation_step=None, main=False, log=logged.append)
    for step in (2, 4, 6, 8):
        outputs.RunOutputs.validate(hooks, step)
        if step == 2:
            assert hooks.best_validation_step is None
    assert (hooks.best_validation, hooks.best_validation_step) == (0.25, 8)
    assert [r["step"] for r in logged] == [2, 4, 6, 8]


def test_metrics_lines_are_strict_json_with_non_finite_values_as_strings():
    # A NaN validation loss was written as a bare NaN, which strict JSON readers (jq, JSON.parse) refuse.
    import io
    from types import SimpleNamespace

    from sd_lora import outputs

    metrics = io.StringIO()
    hooks = SimpleNamespace(main=True, metrics=metrics, tensorboard=None, elapsed=lambda: 1.0,
                            _process=SimpleNamespace(memory_info=lambda: SimpleNamespace(rss=2**20)))
    outputs.RunOutputs.log(hooks, {"step": 4, "val_loss": float("nan"), "loss": float("inf"), "lr": 1e-4})
    line = json.loads(metrics.getvalue(), parse_constant=lambda c: pytest.fail(f"bare {c} in {metrics.getvalue()!r}"))
    assert line == {"step": 4, "val_loss": "nan", "loss": "inf", "lr": 1e-4, "elapsed": 1.0, "rss_mb": 1.0}


def test_a_skipped_steps_finite_numbers_stay_numbers_in_metrics_jsonl(tmp_path):
    """Only NaN and inf are written as strings (strict JSON has no such numbers); a step skipped for an infinite
    gradient norm wrote its finite loss as the string "0.25" too."""
    import io
    from types import SimpleNamespace

    import psutil

    from sd_lora.loop import StepRecord
    from sd_lora.outputs import RunOutputs

    hooks = SimpleNamespace(main=True, metrics=io.StringIO(), tensorboard=None, _process=psutil.Process(), elapsed=lambda: 1.0,
                            progress=SimpleNamespace(write=lambda text: None), config=SimpleNamespace(nan_skip=2))
    hooks.log = lambda record: RunOutputs.log(hooks, record)
    RunOutputs.on_skipped_step(hooks, StepRecord(step=3, epoch=0, lr=1e-4, seconds=0.1, loss=0.25, grad_norm=float("inf")), 1)
    RunOutputs.on_skipped_step(hooks, StepRecord(step=4, epoch=0, lr=1e-4, seconds=0.1, loss=float("nan"), grad_norm=2.0), 2)
    lines = [json.loads(line) for line in hooks.metrics.getvalue().splitlines()]
    assert [(r["step"], r["skipped"], r["loss"], r["grad_norm"]) for r in lines] == [(3, True, 0.25, "inf"), (4, True, "nan", 2.0)]


def test_prodigys_step_size_is_logged_beside_the_learning_rate():
    from types import SimpleNamespace

    from sd_lora.loop import StepRecord
    from sd_lora.outputs import RunOutputs

    hooks = SimpleNamespace(main=False, smoothed=None)
    logged = []
    hooks.log = logged.append
    RunOutputs.on_step_logged(hooks, StepRecord(step=1, epoch=0, lr=1.0, seconds=0.1, loss=0.25, grad_norm=1.0, d_lr=2e-6))
    RunOutputs.on_step_logged(hooks, StepRecord(step=2, epoch=0, lr=1e-4, seconds=0.1, loss=0.25, grad_norm=1.0))
    assert logged[0]["lr"] == 1.0 and logged[0]["d_lr"] == 2e-6
    assert "d_lr" not in logged[1]  # not Prodigy: lr is the rate


def test_a_sample_grid_or_metrics_line_that_cannot_be_written_is_named_and_the_lora_kept(tiny_dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A full disk (or a samples/ folder the run may not write) met while writing a grid or a metrics.jsonl line
    ended the run with an OSError traceback and the steps since the last save lost: now a message names the file and
    the fix, and the LoRA of the step is saved (where there is room for it: here only those writes fail)."""
    from safetensors import safe_open

    from sd_lora import outputs
    from sd_lora.sampling import sampler
    from sd_lora.train import main

    write = sampler.atomic_write_bytes

    def full_for_step_2(path, data):
        if path.name == "zk-step00000002.png":
            raise OSError(28, "No space left on device")
        return write(path, data)

    monkeypatch.setattr(sampler, "atomic_write_bytes", full_for_step_2)
    out = tmp_path / "grid"
    assert main(epoch_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--sample-every", "2")) == 2
    err = capsys.readouterr().err
    assert f"sd_lora: error: could not save {out / 'samples' / 'zk-step00000002.png'}: No space left on device; free some space" in err
    assert "Traceback" not in err and not [p for p in (out / "samples").iterdir() if p.name.endswith(".tmp")]
    with safe_open(str(out / "zk-step00000002.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
    monkeypatch.undo()

    on_step_end = outputs.RunOutputs.on_step_end

    def disk_fills_after_step_1(self, state):
        on_step_end(self, state)
        if state.step == 1:  # metrics.jsonl's next line goes to a device that is always full
            self.metrics.close()
            self.metrics = open("/dev/full", "w", encoding="utf-8", buffering=1)

    monkeypatch.setattr(outputs.RunOutputs, "on_step_end", disk_fills_after_step_1)
    out = tmp_path / "metrics"
    assert main(epoch_args(tiny_dataset, tiny_model_dir, out, "--max-steps", "4", "--sample-every", "0")) == 2
    err = capsys.readouterr().err
    assert f"sd_lora: error: could not write {out / 'metrics.jsonl'}: No space left on device" in err and "Traceback" not in err
    with safe_open(str(out / "zk-step00000002.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"
