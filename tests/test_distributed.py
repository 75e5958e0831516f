"""Two processes on the CPU (gloo) under `accelerate launch`: same result as one process with the same
global batch, and only the main process writes files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_lora.config import load_config
from sd_lora.train import run

COMMON = ["--resolution", "32", "--rank", "4", "--max-steps", "4", "--save-precision", "fp32", "--learning-rate", "1e-3",
          "--sample-steps", "2", "--sample-seeds", "1", "--sample-every", "2", "--save-every", "2", "--flip"]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_dataset, tiny_model_dir, tmp_path):
    out2 = tmp_path / "two"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "sd_lora.train", "--data", str(tiny_dataset), "--model", str(tiny_model_dir),
           "--output-dir", str(out2), "--batch-size", "2", *COMMON]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout and proc.stdout.count("done: ") == 1  # one summary, one writer

    one = run(load_config(["--data", str(tiny_dataset), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "one"),
                           "--batch-size", "4", *COMMON]))
    a, b = load_file(str(one.path)), load_file(str(out2 / "data.safetensors"))
    assert a.keys() == b.keys()
    # Only the order of floating-point reductions differs (gradients all-reduced over 2 ranks vs summed in one
    # batch); Adam divides by sqrt(v), which magnifies those last-bit differences on tiny gradients, so the
    # bound is relative to the size of the learned up-projections.
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a if k.endswith("lora_up.weight"))
    assert scale > 0 and diff < 1e-2 * scale, (diff, scale)
    # Exactly one copy of every output: metrics once per step, grids and saves once.
    steps = [json.loads(line)["step"] for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (out2 / "samples").iterdir()) == ["data-compare-step00000004.png", "data-step00000000.png", "data-step00000002.png", "data-step00000004.png"]
    assert sorted(p.name for p in out2.glob("*.safetensors")) == ["data-step00000002.safetensors", "data.safetensors"]


@pytest.mark.slow
@pytest.mark.parametrize("family, extra", [("sd1", ["--clip-skip", "2"]), ("sdxl", [])])
def test_two_processes_train_the_text_encoder(tiny_dataset, tiny_model_dir, tiny_sdxl_model_dir, tmp_path, family, extra):
    """LoRA layers after the hidden state that conditions the U-Net (--clip-skip 2; SDXL's first encoder) get
    no gradient, which DDP refuses unless told; and clip skip reached through DDP's wrapper for the final norm."""
    model = tiny_model_dir if family == "sd1" else tiny_sdxl_model_dir
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "sd_lora.train", "--data", str(tiny_dataset), "--model", str(model),
           "--output-dir", str(tmp_path / "two"), "--batch-size", "2", "--train-text-encoder", "--sample-every", "0",
           "--resolution", "32", "--rank", "4", "--max-steps", "2", "--save-precision", "fp32", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora = load_file(str(tmp_path / "two" / "data.safetensors"))
    te_ups = [k for k in lora if k.startswith("lora_te") and k.endswith("lora_up.weight")]
    assert te_ups and any(lora[k].abs().max() > 0 for k in te_ups)  # the text encoder's LoRA trained


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_at_the_same_step_and_resume_finishes(tiny_dataset, tiny_model_dir, tmp_path):
    """SIGTERM reaches rank 1 only (a scheduler or the OOM killer picks one process): the ranks still decide
    together, the main process saves the LoRA and the training state of that step, and resuming with two
    processes finishes the run."""
    import signal
    import time

    import psutil

    out = tmp_path / "stopped"
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "sd_lora.train", "--data", str(tiny_dataset), "--model", str(tiny_model_dir),
              "--output-dir", str(out), "--output-name", "zk", "--batch-size", "2", "--resolution", "32", "--rank", "4", "--sample-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*launch, "--max-steps", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    ranks = {int(p.environ().get("RANK", -1)): p for p in psutil.Process(proc.pid).children(recursive=True) if "RANK" in p.environ()}
    ranks[1].send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert stderr.count("stopped by SIGTERM at step ") == 1 and stderr.count("stopped by a signal to another process at step ") == 1
    stopped_at = {int(line.split(" at step ")[1].split()[0]) for line in stderr.splitlines() if " at step " in line and "stopped by" in line}
    assert len(stopped_at) == 1  # both ranks at the same step
    step = stopped_at.pop()
    assert 3 <= step < 400
    assert (out / f"state-{step:08d}").is_dir() and (out / f"zk-step{step:08d}.safetensors").is_file()
    assert stderr.count("To continue: accelerate launch --multi_gpu --num_processes 2 -m sd_lora.train --config ") == 2  # as many processes
    assert not (out / "zk.safetensors").exists()  # no "final" file for an unfinished run

    resumed = subprocess.run([*launch, "--max-steps", str(step + 2), "--resume", "latest"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "zk.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, step + 3))


# Runs sd_lora.train in each rank and records, into $PROBE_OUT/rank<R>.pt, the LoRA weights right after their
# initialisation (before DDP, which would copy rank 0's anyway) and where each LoRA dropout zeroed its output
# during training (the mask: the inputs are never exactly zero).
PROBE = """
import os, sys
from pathlib import Path
import torch
import sd_lora.train as train

record = {"masks": []}
prepare_models, loop_train, dropout_forward = train.prepare_models, train.loop.train, torch.nn.Dropout.forward

def prepare_and_record(*args, **kwargs):
    trainable = prepare_models(*args, **kwargs)
    record["init"] = [p.detach().clone() for p in trainable]
    return trainable

def dropout_and_record(self, x):
    y = dropout_forward(self, x)
    if self.training and self.p > 0 and record.get("training"):
        record["masks"].append(y == 0)
    return y

def train_and_record(*args, **kwargs):
    record["training"] = True
    try:
        return loop_train(*args, **kwargs)
    finally:
        record["training"] = False
        torch.save(record, Path(os.environ["PROBE_OUT"]) / f"rank{os.environ['RANK']}.pt")

train.prepare_models, train.loop.train, torch.nn.Dropout.forward = prepare_and_record, train_and_record, dropout_and_record
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ranks_draw_their_own_dropout_masks_from_the_same_lora_and_resume_exactly(tiny_dataset, tiny_model_dir, tmp_path):
    """--lora-dropout with two processes: both start from the same LoRA weights, but each drops its own units
    (one global stream would apply the same masks to both ranks' different images); and a run stopped at step 2
    and resumed to step 4 ends with the LoRA of an uninterrupted run, bit for bit: every rank's random states
    are in the training state. Without the latent cache the VAE posterior draws are sharded too."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", PROBE_OUT=str(tmp_path))

    def launch(out, *extra):
        cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(probe), "--data", str(tiny_dataset), "--model", str(tiny_model_dir),
               "--output-dir", str(tmp_path / out), "--batch-size", "2", "--resolution", "32", "--rank", "4", "--sample-every", "0",
               "--save-precision", "fp32", "--learning-rate", "1e-2", "--lora-dropout", "0.5", "--no-cache-latents", "--flip",
               "--save-state-every", "2", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    launch("full", "--max-steps", "4")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert len(ranks[0]["init"]) > 0 and all(torch.equal(a, b) for a, b in zip(ranks[0]["init"], ranks[1]["init"]))
    masks = [torch.cat([m.flatten() for m in rank["masks"]]).float() for rank in ranks]
    assert masks[0].numel() == masks[1].numel() > 1000
    assert 0.4 < masks[0].mean() < 0.6 and 0.4 < masks[1].mean() < 0.6  # p = 0.5 on each rank
    agreement = (masks[0] == masks[1]).float().mean().item()
    assert 0.4 < agreement < 0.6, agreement  # independent masks agree half the time; one stream for both: always

    launch("stopped", "--max-steps", "2")
    resumed = launch("stopped", "--max-steps", "4", "--resume", "latest")
    a, b = load_file(str(tmp_path / "full" / "data.safetensors")), load_file(str(tmp_path / "stopped" / "data.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "random states of" not in resumed.stdout  # both ranks' sets were saved: no note


def launch_two(*args, timeout=120) -> subprocess.CompletedProcess:
    """`accelerate launch` of two processes; on a timeout the launcher and both ranks are ended (a hang fails the
    test without leaving processes behind)."""
    import signal

    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_an_error_every_process_raises_is_printed_once(tmp_path):
    proc = launch_two("-m", "sd_lora.train", "--data", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert proc.stderr.count("sd_lora: error: ") == 1 and proc.stderr.count("folder not found") == 1, proc.stderr[-3000:]


# Rank 1 alone finds an image it cannot load (changed since the scan) from its 4th image on. An error held back as
# one every process raises would wait 10 minutes.
BAD_IMAGE_ON_RANK_1 = """
import os, sys
import sd_lora.errors
import sd_lora.train as train
from sd_lora.data.dataset import ImageDataset
from sd_lora.errors import UserError

load_pixels, loaded = ImageDataset.load_pixels, []

def failing_on_rank_1(self, index, plan, *, flip=False):
    loaded.append(index)
    if os.environ["RANK"] == "1" and len(loaded) > 3:
        raise UserError(f"{self.records[index].path}: cannot decode image (truncated file)")
    return load_pixels(self, index, plan, flip=flip)

ImageDataset.load_pixels, sd_lora.errors.SECONDARY_GRACE_SECONDS = failing_on_rank_1, 600
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_an_image_only_one_process_fails_on_is_reported_by_it_without_a_hang(tiny_dataset, tiny_model_dir, tmp_path):
    import time

    probe = tmp_path / "probe.py"
    probe.write_text(BAD_IMAGE_ON_RANK_1)
    started = time.monotonic()
    proc = launch_two(str(probe), "--data", str(tiny_dataset), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "out"),
                      "--resolution", "32", "--rank", "4", "--batch-size", "1", "--max-steps", "50", "--sample-every", "0",
                      "--no-cache-latents")
    assert proc.returncode != 0
    assert proc.stderr.count("sd_lora: error: ") == 1 and proc.stderr.count("cannot decode image (truncated file)") == 1, proc.stderr[-3000:]
    assert time.monotonic() - started < 100  # the other process was not left waiting, nor this one held back


# Runs sd_lora.train and, before the first step, the validation loss of the first 1, 3 and all held-out images,
# recording into $PROBE_OUT/<rank>.pt (<rank>: "single" without accelerate) each loss, the images the U-Net saw
# in this process and the seconds it took; the calls of a DDP wrapper's forward during those losses; and the loss
# each RunOutputs.validate returned.
VALIDATION_PROBE = """
import os, sys, time
from pathlib import Path
import torch
from torch.nn.parallel import DistributedDataParallel
import sd_lora.train as train
from sd_lora.outputs import RunOutputs
from sd_lora.validation import validation_loss

record = {"subsets": {}, "validate": [], "ddp_forwards": 0}
loop_train, validate, ddp_forward = train.loop.train, RunOutputs.validate, DistributedDataParallel.forward

def count_ddp_forward(self, *args, **kwargs):
    record["ddp_forwards"] += record.get("validating", 0)
    return ddp_forward(self, *args, **kwargs)

def train_and_record(trainee, objective, state, *, hooks, **kwargs):
    rows = []
    unet = trainee.accelerator.unwrap_model(trainee.unet)
    hook = unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    items = hooks.validation_items
    record["validating"] = 1
    for n in sorted({1, 3, len(items)}):
        rows.clear()
        started = time.perf_counter()
        loss = validation_loss(trainee, objective, items[:n], hooks.config.batch_size)
        record["subsets"][n] = (loss, sum(rows), time.perf_counter() - started)
    hook.remove()
    record["validating"] = 0
    try:
        return loop_train(trainee, objective, state, hooks=hooks, **kwargs)
    finally:
        torch.save(record, Path(os.environ["PROBE_OUT"]) / (os.environ.get("RANK", "single") + ".pt"))

def validate_and_record(self, step):
    value = validate(self, step)
    record["validate"].append(value)
    return value

train.loop.train, RunOutputs.validate = train_and_record, validate_and_record
DistributedDataParallel.forward = count_ddp_forward
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_processes_share_the_validation_images_and_agree_on_one_loss(tiny_model_dir, tmp_path, monkeypatch):
    """Each process runs the U-Net on about half the held-out images, also with fewer images than processes
    (a process with none still joins the sum), and both get the one-process loss. With --train-text-encoder the
    text encoders run in validation too; they and the U-Net are DDP-wrapped for training, and validation must
    not go through the wrappers: a wrapper's forward may broadcast buffers, a collective that a process with
    fewer or no images would not join."""
    from helpers import write_dataset

    probe = tmp_path / "probe.py"
    probe.write_text(VALIDATION_PROBE)
    data = write_dataset(tmp_path / "data", count=10)  # 5 held out, in 3 bucket shapes
    args = ["--data", str(data), "--model", str(tiny_model_dir), "--batch-size", "2", "--resolution", "32", "--rank", "4",
            "--max-steps", "1", "--sample-every", "0", "--validation-split", "0.5", "--train-text-encoder"]
    monkeypatch.setenv("PROBE_OUT", str(tmp_path))
    proc = launch_two(str(probe), *args, "--output-dir", str(tmp_path / "two"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run([sys.executable, str(probe), *args, "--output-dir", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr[-3000:]

    single = torch.load(tmp_path / "single.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in ("0", "1")]
    assert sorted(single["subsets"]) == [1, 3, 5]
    assert [rank["ddp_forwards"] for rank in ranks] == [0, 0]
    for n, (loss, rows, _) in single["subsets"].items():
        assert rows == n
        shares = [rank["subsets"][n] for rank in ranks]
        assert [rows for _, rows, _ in shares] == [(n + 1) // 2, n // 2]  # every image once, split evenly
        assert shares[0][0] == shares[1][0]  # one number on both processes
        assert shares[0][0] == pytest.approx(loss, rel=1e-6)
    # The end's validation: the same loss on both processes, logged once (by the main process).
    assert len(ranks[0]["validate"]) == 1 and ranks[0]["validate"] == ranks[1]["validate"]
    logged = [json.loads(line)["val_loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert logged == ranks[0]["validate"]
