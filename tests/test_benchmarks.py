"""The benchmark scripts' own argument checks: a bad name or number is a usage error before any model is written
or any step runs, not a traceback after (the benchmarks themselves are timed in benchmarks/, never here)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    # a worker refused the name only once the model was written (minutes and 4 GiB for --model sd15)
    (["--only", "nope,default"], "--only: unknown configurations nope (known: naive, sd15, default, "),
    # --repeats 0: statistics.StatisticsError "no median for empty data" after the model was written
    (["--only", "default", "--repeats", "0"], "--repeats 0: must be 1 or more"),
    (["--only", "default", "--steps", "0", "--rank", "-1"], "--steps 0: must be 1 or more; --rank -1: must be 1 or more"),
    # a --profile of a configuration the run does not measure was silently ignored
    (["--only", "default", "--profile", "naive"], "--profile naive: not a configuration this run measures (default)"),
    # --quick replaced the run lengths the user gave (here a bad one, which then went unnoticed)
    (["--quick", "--only", "default", "--steps", "0"], "--steps 0: must be 1 or more"),
])
def test_train_speed_refuses_bad_arguments_before_writing_the_model(tmp_path, args, message):
    done = _run("train_speed.py", "--out", str(tmp_path / "out"), *args)
    assert done.returncode == 2 and f"train_speed.py: error: {message}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", ["1", "2"])
def test_soak_refuses_too_few_steps_for_a_slope(tmp_path, steps):
    # --steps 1 and 2 trained, then failed in the slope fit (StatisticsError, ZeroDivisionError)
    done = _run("soak.py", "--steps", steps, "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and f"soak.py: error: --steps {steps}: must be 3 or more" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, args, message", [
    # --resolution 0 silently became the model's default resolution; --rank 0 failed in sd_lora's config check
    ("batch_sizes.py", ["--models", "tiny", "--resolution", "0"], "--steps, --max-batch, --rank and --resolution must be >= 1"),
    ("batch_sizes.py", ["--models", "tiny", "--rank", "0"], "--steps, --max-batch, --rank and --resolution must be >= 1"),
    # tracebacks after the model was written: sd_lora's ConfigError, an IndexError of the naive loop's empty step list
    ("rss_phases.py", ["naive", "--steps", "0", "--rank", "0"], "--steps 0, --rank 0: must be 1 or more"),
    # on a GPU: the model written, then a traceback of sd_lora's ConfigError (on a CPU: "needs a CUDA GPU")
    ("sync_check.py", ["--resolution", "0"], "--resolution 0: must be 1 or more"),
    # a CalledProcessError of the worker, its own error hidden
    ("load_peak.py", ["--model-dir", "nope"], "--model-dir nope: not a diffusers model folder (needs unet/config.json)"),
    # took no options: any argument (even --help) ran the whole measurement
    ("conv_peak.py", [], "unrecognized arguments: --out"),
])
def test_other_benchmarks_refuse_bad_numbers_and_folders_before_any_work(tmp_path, script, args, message):
    done = _run(script, "--out", str(tmp_path / "out"), *args)
    assert done.returncode == 2 and f"{script}: error: {message}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], "argument --images: must be at least 1, got 0"),
    (["--size", "4032"], "argument --size: expected WIDTHxHEIGHT such as 4032x3024, got '4032'"),
    (["--size", "32x32"], "argument --size: 32x32: each side at least 64 px and at most 50 megapixels"),
    (["--resolution", "100"], "argument --resolution: a multiple of 64 px (SD's bucket step), got 100"),
])
def test_image_decode_refuses_bad_arguments(args, message):
    done = _run("image_decode.py", *args)
    assert done.returncode == 2 and f"image_decode.py: error: {message}" in done.stderr and "Traceback" not in done.stderr


def test_image_decode_reports_both_decodes_and_the_ratios():
    done = _run("image_decode.py", "--images", "2", "--size", "640x480", "--resolution", "64", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2 JPEGs of 640x480 (half progressive), bucket ")
    difference = float(lines[3].split(" by ")[1].split(" levels")[0])
    assert 0 < difference < 1  # decoded at 1/2 scale for a 64 px bucket: not the full decode, and close to it
    assert [part.split("=")[0] for part in lines[-1].split()] == [
        "scan_check_speedup", "load_speedup", "pipeline_images_per_s_ratio"]


def test_batch_sizes_tries_no_batch_above_max_batch(monkeypatch):
    # --max-batch 1 still ran "batch 2" on its one-image dataset: sd_lora trained batches of 1, reported as 2
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import batch_sizes

    tried = []
    monkeypatch.setattr(batch_sizes, "train", lambda args, model, batch: tried.append(batch) or {"batch": batch, "ok": True})
    runs = batch_sizes.largest_batch(argparse.Namespace(max_batch=1), "tiny")
    assert tried == [1] and [r["batch"] for r in runs] == [1]


def test_batch_sizes_table_names_the_rank_trained(monkeypatch, capsys):
    # the heading said "rank-16" whatever --rank was
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import batch_sizes

    run = {"batch": 1, "ok": True, "s_per_it": 0.5, "images_per_s": 2.0, "peak_mib": 900.0, "peak_rss_mib": 900.0, "device_total_mib": None}
    batch_sizes.report("tiny", 64, 4, [run], max_batch=8)
    assert "tiny at 64 px, rank-4 attn-mlp LoRA" in capsys.readouterr().out


def test_batch_sizes_says_when_the_largest_batch_is_the_max_batch_cap(monkeypatch, capsys):
    # a batch capped by --max-batch read "the next size up was not tried", as if a larger one might have fitted
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import batch_sizes

    runs = [{"batch": b, "ok": True, "s_per_it": 0.5, "images_per_s": 2.0, "peak_mib": 900.0 + b, "peak_rss_mib": 900.0,
             "device_total_mib": None} for b in (1, 2, 8)]
    batch_sizes.report("tiny", 64, 16, runs, max_batch=8)
    assert "largest batch that fitted: 8 (--max-batch 8: no larger batch tried)" in capsys.readouterr().out
    batch_sizes.report("tiny", 64, 16, runs, max_batch=64)
    assert "largest batch that fitted: 8 (the next size up was not tried)" in capsys.readouterr().out


def test_soak_clears_only_its_own_folders_under_out(tmp_path, monkeypatch):
    # --out was removed whole before the run: `--out .` deleted the folder it ran in
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import soak

    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("a previous soak run")
    monkeypatch.setattr(soak, "write_dataset", lambda root, count: root)
    monkeypatch.setattr(soak, "save_tiny_model", lambda folder: folder)
    monkeypatch.setattr(soak, "train_main", lambda argv: 1)  # stop before training
    monkeypatch.setattr(sys, "argv", ["soak.py", "--steps", "3", "--out", str(tmp_path)])
    assert soak.main() == 1
    assert (tmp_path / "keep.txt").read_text() == "mine" and not (tmp_path / "run").exists()
