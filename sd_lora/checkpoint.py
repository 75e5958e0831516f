"""Full training state: everything needed to continue a run as if it had never stopped.

A state folder `state-NNNNNNNN/` holds the trainable (LoRA) tensors by name, the optimizer and LR-schedule
state, the progress counters (step, epoch, batch within the epoch), every random-number state (python,
numpy, torch CPU/CUDA, the training generator; one set per process) and the resolved config. It is written
into a temporary folder, fsync'd and renamed, so a crash mid-save leaves the previous state intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import FIELDS, TrainConfig, read_toml
from .errors import UserError
from .fsio import TEMPORARY_NAME, held_by_writer, temporary_beside, usual_permissions

STATE_PREFIX = "state-"
REPLACED_NAME = re.compile(rf"\.(?P<state>{STATE_PREFIX}\d+)\.replaced")
"""Where `_swap_in` moves the state folder it replaces while the new one is renamed into place."""


@dataclass
class Progress:
    step: int
    epoch: int
    batch_in_epoch: int
    nan_steps: int = 0
    best_validation: float | None = None
    best_validation_step: int | None = None
    # The files of the run's scheduled saves so far, oldest first (one list per save: --format both writes two),
    # as absolute paths: --keep-saves deletes only files the run wrote, also after a resume. Older states: none.
    saves: list[list[str]] = field(default_factory=list)
    log_run: str | None = None  # the TensorBoard run folder under --logging-dir (tensorboard_log.py): a resume continues it
    loss_average: float | None = None  # metrics.jsonl's loss_average (a moving average) so far: a resume continues it
    # When the run first started (Unix time: ss_training_started_at) and the seconds it has trained so far
    # (metrics.jsonl's elapsed): a resume goes on counting from both. Older states: None, a resume starts afresh.
    started_at: float | None = None
    elapsed: float | None = None
    # How many processes trained: a step's global batch is --batch-size x processes, and `batch_in_epoch` counts
    # those batches, so a resume must use as many (`load_state`). Older states: None, not checked.
    processes: int | None = None
    # ss_session_id of the process that trained the state's weights: a resume's files of this very step (the
    # scheduled ones a finished run left to its final file, a stop before any new step) keep it. Older states: None.
    session_id: int | None = None


def state_dir_name(step: int) -> str:
    return f"{STATE_PREFIX}{step:08d}"


def trainable_tensors(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{"unet.<param name>": tensor} for every parameter that trains (the LoRA weights)."""
    return {
        f"{prefix}.{name}": p.detach().cpu().contiguous()
        for prefix, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


# Random streams with several processes. Two kinds, two rules:
# - the training generator (noise, timesteps, VAE posterior) is the same on every rank, and each rank keeps its
#   slice of a global-batch draw (diffusion.py): it must stay identical, so one saved copy would do;
# - the global RNGs (python, numpy, torch CPU/CUDA) drive LoRA dropout: they must differ between ranks, or every
#   GPU applies the same masks to its different images. They start alike (seeded with --seed, so the LoRA
#   initialisation matches), then `seed_process` gives each rank but rank 0 its own stream. Rank 0 keeps the
#   stream one process has, so a single-process run is what it was before there were several.
# A state folder keeps every rank's set (`rng_states` gathered in rank order, like accelerate's per-process
# random_states_<i>.pkl), so a resume continues every rank's stream. A set saved by one process (a state from
# before this, a single-process run, or a rescue save by the main process alone) is restored on every rank, and
# each rank but 0 then reseeds its global RNGs from (seed, rank, step): its masks differ again, but from there on
# the run no longer matches an uninterrupted one draw for draw.


def process_seed(seed: int, rank: int, step: int) -> int:
    """A 64-bit seed for rank `rank`'s global RNGs from step `step` on; SeedSequence mixes the three without the
    collisions of seed + rank (accelerate's `set_seed(device_specific=True)`: rank 1 of seed 42 = rank 0 of 43)."""
    state = np.random.SeedSequence([seed % 2**64, rank, step]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def seed_process(seed: int, rank: int, step: int = 0) -> None:
    """Give this process its own global random streams (python, numpy, torch CPU and CUDA) after the draws that
    must match on every rank (the LoRA initialisation). Rank 0 is left alone: one process runs as it always did."""
    if rank == 0:
        return
    value = process_seed(seed, rank, step)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # CPU and every CUDA device


def rng_states(generator: torch.Generator) -> dict:
    """This process's random states: the global RNGs and the training generator."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def restore_rng_states(saved: dict | list[dict], generator: torch.Generator, *, rank: int = 0, seed: int = 0, step: int = 0) -> bool:
    """Restore rank `rank`'s states from `saved` (`rng_states` of every rank in rank order; a single dict is
    the one set of a state folder written before states were kept per rank). True when `saved` holds this
    rank's own set; otherwise rank 0's set is restored and `seed_process(seed, rank, step)` reseeds the
    global RNGs (see the note above), and False says the run is no longer exact from here.

    A state saved on another kind of device (a GPU run resumed on the CPU, or the reverse) holds a training
    generator of that device, which this one cannot take: it is reseeded from (seed, step), the same on every
    rank, and False is returned too. GPUs this machine lacks (a state saved with more visible) are left out."""
    by_rank = saved if isinstance(saved, list) else [saved]
    own = rank < len(by_rank)
    states = by_rank[rank if own else 0]
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    for index, state in enumerate(states["cuda"][:torch.cuda.device_count()] if torch.cuda.is_available() else []):
        torch.cuda.set_rng_state(state, index)
    moved = states["generator"].numel() != generator.get_state().numel()  # a CPU and a CUDA generator's states differ
    if moved:
        generator.manual_seed(process_seed(seed, 0, step))
    else:
        generator.set_state(states["generator"])
    if not own:
        seed_process(seed, rank, step)
    return own and not moved


def saved_processes(training: dict) -> int:
    """How many processes' random states a loaded training state holds (1 for a state from before per-rank sets)."""
    return len(training["rng"]) if isinstance(training["rng"], list) else 1


def rng_note(loaded: LoadedState, processes: int) -> str | None:
    """What a resume with `processes` processes cannot continue exactly (None when every rank has its own states)."""
    saved = saved_processes(loaded.training)
    if saved >= processes:
        return None
    return (f"{loaded.path} holds the random states of {saved} process{'es' * (saved > 1)} and this run has {processes}: "
            "the other ranks draw new dropout masks from here, so the run will not match an uninterrupted one exactly")


def save_state(
    output_dir: Path,
    *,
    progress: Progress,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    rng: list[dict],
    config: TrainConfig,
    data_fingerprint: str,
    keep: int,
    after: int | None = None,
) -> Path:
    """Write `output_dir/state-<step>/` atomically and keep only the newest `keep` state folders. Folders of steps
    after `after` (default: this state's step) are first set aside (`set_aside`, not deleted: another run trained
    them): a run that went on past the state this run resumed from (or an earlier run in the folder) left them, and
    `--resume latest` must continue this run, not that one (nor may `keep` count them and delete this run's
    states). A run's first state passes the step the run started from: every folder after it is another run's,
    also one at this very step, which would be replaced. `rng`: `rng_states` of every process, in rank order
    (one entry with one process)."""
    final = output_dir / state_dir_name(progress.step)
    with temporary_beside(final, folder=True) as tmp:  # removed if anything below fails
        save_file(trainable_tensors(modules), str(tmp / "lora_params.safetensors"))
        training = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "rng": list(rng)}
        scaler = getattr(optimizer, "scaler", None)  # fp16's loss scale (accelerate's optimizer wrapper holds it)
        if scaler is not None:
            training["scaler"] = scaler.state_dict()
        torch.save(training, tmp / "training_state.pt")
        meta = {"progress": asdict(progress), "data_fingerprint": data_fingerprint}
        (tmp / "progress.json").write_text(json.dumps(meta, indent=2))
        (tmp / "config.toml").write_text(config.to_toml(), encoding="utf-8")
        for f in tmp.iterdir():
            usual_permissions(f)
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        for later in later_states(output_dir, progress.step if after is None else after):
            set_aside(later)
        _swap_in(tmp, final)
    for old in list_states(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _swap_in(new: Path, final: Path) -> None:
    """Move the folder `new` to `final`. A `final` already there (re-saving a step, e.g. an interrupt right after a
    periodic save) is moved aside first and deleted only once `new` is in place, or put back if that fails: at no
    moment is neither on disk."""
    if not final.exists():
        os.replace(new, final)
        return
    replaced = final.with_name(f".{final.name}.replaced")  # REPLACED_NAME: `finish_swaps` knows it
    shutil.rmtree(replaced, ignore_errors=True)
    final.rename(replaced)
    try:
        os.replace(new, final)
    except BaseException:
        replaced.rename(final)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def finish_swaps(output_dir: Path) -> str | None:
    """Finish the `_swap_in`s that a run killed outright (`kill -9`, the OOM killer, a power cut) while re-saving a step
    left undone in `output_dir`. A `.state-N.replaced` without its `state-N` is that step's only complete state (killed
    between the two renames; the new one is a temporary `remove_abandoned_saves` deletes): it is put back as `state-N`,
    or `--resume latest` would not find it. One beside its `state-N` is the old copy the swap replaced (killed before
    the last delete): it is deleted. A state another live run is saving is left alone. Call it on the main process,
    before `remove_abandoned_saves` and before a resume looks for states; it returns the line that says what was done,
    or None when nothing was."""
    try:
        names = sorted(entry.name for entry in os.scandir(output_dir) if entry.is_dir(follow_symlinks=False))
    except OSError:  # missing, or not a folder this process may list
        return None
    restored, removed = [], []
    for name in names:
        match = REPLACED_NAME.fullmatch(name)
        if not match or _being_saved(output_dir, match["state"], names):
            continue
        replaced, final = output_dir / name, output_dir / match["state"]
        if not os.path.lexists(final):
            replaced.rename(final)
            restored.append(final.name)
        elif final.is_dir() and not final.is_symlink():
            shutil.rmtree(replaced, ignore_errors=True)
            removed.append(name)
    done = [f"put back {name} from .{name}.replaced (the newer save never finished)" for name in restored]
    done += [f"deleted {name}, the older copy of a state saved again" for name in removed]
    return f"finished what a run killed while re-saving a training state left in {output_dir}: {'; '.join(done)}" if done else None


def _being_saved(output_dir: Path, state: str, names: list[str]) -> bool:
    """Whether a live run holds the lock of `state`'s temporary in `output_dir` (or of `state`, renamed from one)."""
    temporaries = [n for n in names if (m := TEMPORARY_NAME.fullmatch(n)) and m["target"] == state]
    return any(held_by_writer(output_dir / n) for n in [state, *temporaries])


def is_state_name(name: str) -> bool:
    """Whether `name` is a state folder's (`state_dir_name`)."""
    return name.startswith(STATE_PREFIX) and name[len(STATE_PREFIX):].isdigit()


def state_step(path: Path) -> int:
    return int(path.name[len(STATE_PREFIX):])


def later_states(output_dir: Path, step: int) -> list[Path]:
    """State folders in `output_dir` of steps after `step`."""
    return [p for p in list_states(output_dir) if state_step(p) > step]


def set_aside_name(state: Path) -> Path:
    """Where `set_aside` moves `state`: `state-00000008.abandoned` (then `.abandoned-2`, ...), a name `list_states`,
    `--resume latest` and `--keep-states` pass over; `--resume` given the folder still reads it."""
    target, n = state.with_name(f"{state.name}.abandoned"), 1
    while target.exists():
        n += 1
        target = state.with_name(f"{state.name}.abandoned-{n}")
    return target


def set_aside(state: Path) -> Path:
    target = set_aside_name(state)
    state.rename(target)
    return target


def list_states(output_dir: Path) -> list[Path]:
    """Complete state folders in `output_dir`, oldest first (temporary folders are ignored)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and is_state_name(p.name)]
    return sorted(found, key=state_step)


def resume_command(output_dir: Path, processes: int = 1) -> str:
    """The command that continues the run in `output_dir` from its newest state, with as many `processes` as it
    trained with, quoted for a POSIX shell (a folder name with a space or a quote is pasted as one argument)."""
    launcher = "python" if processes == 1 else f"accelerate launch --multi_gpu --num_processes {processes}"
    return f"{launcher} -m sd_lora.train --config {shlex.quote(str(output_dir / 'config.toml'))} --resume latest"


def resolve_resume(resume: str, output_dir: Path) -> Path:
    if resume == "latest":
        states = list_states(output_dir)
        if not states:
            raise UserError(f"--resume latest: no state folder in {output_dir}; states are written by --save-state-every N or on Ctrl-C")
        return states[-1]
    path = Path(resume).expanduser()  # the shell leaves ~ alone in --resume=~/x and in TOML strings
    if not (path / "progress.json").is_file():
        raise UserError(f"--resume {resume}: not a complete state folder (no progress.json); pass 'latest' or a state-NNNNNNNN folder")
    return path


def incompatibilities(saved: dict, config: TrainConfig) -> list[str]:
    """Options that may not change on resume (declared `fixed`), as 'option: saved -> now' lines."""
    now = config.to_dict()
    out = []
    for name, f in FIELDS.items():
        if not f.metadata["fixed"]:
            continue
        key = name.replace("_", "-")
        before, after = saved.get(key), now.get(key)
        if isinstance(before, (int, float)) and isinstance(after, (int, float)) and float(before) == float(after):
            continue
        if before != after:
            out.append(f"--{key}: {before!r} in the saved run, {after!r} now")
    return out


@dataclass
class LoadedState:
    path: Path
    progress: Progress
    tensors: dict[str, torch.Tensor]
    training: dict
    data_fingerprint: str


def load_state(path: Path, config: TrainConfig, data_fingerprint: str, processes: int = 1) -> LoadedState:
    """Read a state folder and refuse it when the run it belongs to differs from `config` in a fixed option or
    trained with another number of `processes` than this one has, or when it is damaged (a disk that filled up or
    failed, a hand-edited file): that error names an older one."""
    try:
        saved_config = read_toml(path / "config.toml")
        meta = json.loads((path / "progress.json").read_text())
        progress = Progress(**meta["progress"])
        # Tensors and plain values only (no pickled code), onto the CPU: with several GPUs every rank would
        # otherwise load rank 0's tensors onto GPU 0; load_state_dict moves them to each parameter's device.
        training = torch.load(path / "training_state.pt", weights_only=True, map_location="cpu")
        tensors = load_file(str(path / "lora_params.safetensors"))
    except Exception as e:  # noqa: BLE001 - whatever fails to read, this folder cannot be resumed from
        older = [p for p in list_states(path.parent) if p.name < path.name]
        fix = (f"resume from an older one (--resume {older[-1]}) or delete this one" if older else
               "no older state is left in that folder: start the run again")
        detail = str(e).splitlines()[0][:200] if str(e) else "no detail"
        raise UserError(f"cannot resume from {path}: the training state is damaged ({type(e).__name__}: {detail}); {fix}") from None
    problems = incompatibilities({k.replace("_", "-"): v for k, v in saved_config.items()}, config)
    if meta.get("data_fingerprint") != data_fingerprint:
        # One fingerprint covers every image set the run reads: name each, not only the training folder.
        sources = [f"--dataset-config {config.dataset_config}" if config.dataset_config else f"--data {config.data}"]
        sources += [f"{flag} {folder}" for flag, folder in (("--reg-data", config.reg_data), ("--validation-data", config.validation_data)) if folder]
        problems.append(f"{' or '.join(sources)}: the images or captions changed since the state was saved")
    if progress.processes is not None and progress.processes != processes:
        # Another count changes the global batch, so the saved position in the epoch (counted in global batches)
        # would point elsewhere in the data and the steps per epoch would change.
        problems.append(f"processes: {progress.processes} in the saved run, {processes} now (each step's global batch is "
                        f"--batch-size x processes); resume with {progress.processes}: {resume_command(path.parent, progress.processes)}")
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"cannot resume from {path}: this run differs from the saved one:\n{listed}\nUse the saved settings (--config {path / 'config.toml'}), or start a new run in another --output-dir")
    return LoadedState(path, progress, tensors, training, meta["data_fingerprint"])


def restore_trainable(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA tensors back by name; any missing or extra name is an error."""
    current = {f"{prefix}.{n}": p for prefix, m in modules.items() for n, p in m.named_parameters() if p.requires_grad}
    missing, unexpected = current.keys() - tensors.keys(), tensors.keys() - current.keys()
    if missing or unexpected:
        raise UserError(f"state does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, p in current.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
