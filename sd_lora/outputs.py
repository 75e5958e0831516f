"""What a run leaves behind, as hooks the loop calls: progress, metrics, sample grids, LoRA files, training
states, validation losses, and the graceful stop on SIGINT/SIGTERM.

Only the main process writes files; every process takes part in the stop decision.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import torch

from . import checkpoint, loop, memory, tensorboard_log
from .compiling import eager
from .config import TrainConfig
from .errors import UserError
from .export import export_lora, lora_components, new_session_id, sgm_paths, trained_modules, training_metadata
from .fsio import atomic_write_text
from .models.load import BaseModel
from .lora.inject import set_lora_enabled
from .sampling.grid import side_by_side_grid
from .sampling.sampler import (SampleSettings, SamplingStopped, build_sampling_pipeline, encode_prompts, generate_grid, generate_images,
                               row_labels, save_grid)
from .validation import validation_loss


class StopRequest:
    """SIGINT/SIGTERM set a flag the loop checks after each optimizer step; a second SIGINT aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        self._owner = os.getpid()

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some notebook runners): no graceful stop
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if os.getpid() != self._owner:
            # A DataLoader worker, forked with this handler: Ctrl-C signals the whole process group, and the
            # worker must keep serving the step in progress; the training process decides and announces.
            return
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user really wants out now
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then saving the LoRA and the training state "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signal is not None


class StopVote:
    """The stop decision of several processes, taken together and one optimizer step late so that no step
    waits for the device: each call queues an all-reduce (max) of every process's flag plus its copy to the
    host, and returns the previous call's result, long computed by then. Every process reads the same result
    at the same step, so all stop together, one step after the first request."""

    def __init__(self, device: torch.device):
        self.device = device
        self._previous: loop.Readout | None = None

    def __call__(self, requested: bool) -> bool:
        import torch.distributed as dist

        flag = torch.full((1,), float(requested), device=self.device)  # filled on the device: no copy from the host
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True).wait()  # NCCL: the stream waits, the host does not
        previous, self._previous = self._previous, loop.Readout(flag)
        return previous is not None and previous.values()[0] > 0


def is_run_save(output_name: str, file_name: str, *, intermediate_only: bool = False) -> bool:
    """Whether `file_name` is named as a LoRA file a run with `output_name` saves: an intermediate save
    (<name>-stepNNNNNNNN: --save-every or Ctrl-C; <name>-NNNNNN: --save-every-epochs) and, unless
    `intermediate_only`, the final <name> and <name>-stepNNNNNNNN-last-good; each also as its -diffusers sibling."""
    middle = r"-step\d{8}|-\d{6}" if intermediate_only else r"(-step\d{8}(-last-good)?|-\d{6})?"
    return re.fullmatch(rf"{re.escape(output_name)}({middle})(-diffusers)?\.safetensors", file_name) is not None


def final_file_step(path: Path) -> int | None:
    """The step (`ss_steps`) a LoRA file of ours records; None without one, or for a missing or unreadable file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            steps = (f.metadata() or {}).get("ss_steps", "")
    except (OSError, ValueError, SafetensorError):  # whatever is there, it is no final file of a finished run
        return None
    return int(steps) if steps.isdigit() else None


def continue_log(path: Path, step: int):
    """`path` (metrics.jsonl) opened to append after `step`. Lines of later steps, left by a run that went on
    past the state now resumed, are dropped first (they would repeat steps), and so is a line a crash cut short."""
    if path.is_file():
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
    return open(path, "a", encoding="utf-8", buffering=1)


class RunOutputs:
    """Implements `loop.Hooks` for a real run."""

    def __init__(self, config: TrainConfig, model: BaseModel, accelerator, *, trainee: loop.Trainee, objective: loop.Objective,
                 run_meta: dict, prompts, total_steps: int, total_epochs: int, targets: str, start_step: int,
                 data_fingerprint: str, validation_items: list, stop: StopRequest, progress: checkpoint.Progress | None = None):
        from tqdm.auto import tqdm

        self.config, self.model, self.acc = config, model, accelerator
        self.trainee, self.objective = trainee, objective
        self.run_meta, self.prompts = run_meta, prompts
        self.main = accelerator.is_main_process
        # ss_training_started_at: the run's first start, also after a resume; elapsed counts training time only
        self.started_at = progress.started_at if progress and progress.started_at is not None else time.time()
        self.elapsed_before = progress.elapsed if progress and progress.elapsed is not None else 0.0
        self.session_id = new_session_id()  # ss_session_id: this process's, a resume is a new session as in kohya
        # the session that trained the resumed step's weights (None: unknown, a state from before ss_session_id)
        self.resumed_session = progress.session_id if progress else self.session_id
        self.start_step = start_step
        self.process_started = time.time()
        self.out = config.output_dir
        self.total_steps, self.total_epochs = total_steps, total_epochs
        self.targets = targets  # the U-Net's LoRA modules as a --targets preset, or "custom" (an --init-weights file's)
        self.data_fingerprint = data_fingerprint
        self.validation_items = validation_items
        self.stop = stop
        self.stop_vote = StopVote(accelerator.device) if accelerator.num_processes > 1 else None
        self.stopped = False  # the common decision to stop early, once taken
        self.conditioning: list[dict] | None = None  # the sample prompts' text conditioning (encode_prompts)
        self.best_validation = progress.best_validation if progress else None
        self.best_validation_step = progress.best_validation_step if progress else None
        self.smoothed: float | None = progress.loss_average if progress else None  # loss_average goes on after a resume
        self.state = loop.TrainState()
        self.saved: list[Path] = []
        self.weights_saved_at: int | None = None  # the step whose weights this process last wrote (a LoRA file or a state)
        self.states_after: int | None = start_step  # until this run's first state: the states after it are another run's
        # --save-every/--save-every-epochs files of this run, oldest first (--keep-saves), and the epochs whose end
        # the hooks have seen: a resumed run knows both from its state, so no epoch end is handled twice.
        self.scheduled_saves = [[Path(p) for p in save] for save in progress.saves] if progress else []
        self.epochs_done = progress.epoch if progress else 0
        self.grids: list[Path] = []
        # images[prompt][seed] of step 0's grid and of the latest grid drawn in this process (not all: memory)
        self.step_0_cells: list | None = None
        self.last_sampled: tuple[int, list] | None = None
        # Step 0's samples are the base model's exactly when training starts from zero LoRA weights here.
        self.base_at_step_0 = start_step == 0 and not config.init_weights
        self.first_step = start_step + 1  # after it the peak includes a step's activations: reported once
        self.progress = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=not self.main, dynamic_ncols=True)
        self._process = psutil.Process()
        if self.main:
            atomic_write_text(self.out / "config.toml", config.to_toml())
            # A resumed run continues its log; a new run in the same folder starts one (old lines would repeat steps).
            log = self.out / "metrics.jsonl"
            self.metrics = continue_log(log, progress.step) if progress else open(log, "w", encoding="utf-8", buffering=1)
        self.tensorboard: tensorboard_log.TensorBoardLog | None = None
        self.log_run = progress.log_run if progress else None  # kept in the states even while TensorBoard is off
        if self.main and config.log_with == "tensorboard":
            self.log_run = self.log_run or tensorboard_log.new_run(config, self.started_at)
            self.tensorboard = tensorboard_log.TensorBoardLog(tensorboard_log.logging_dir(config) / self.log_run, start_step)

    # --- loop.Hooks ------------------------------------------------------------------------------------

    def on_step_logged(self, record: loop.StepRecord) -> None:
        loss = record.loss
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        norm = record.grad_norm if math.isfinite(record.grad_norm) else None  # fp16: the loss scaler's overflow steps; JSON has no inf
        lrs = {"lr": record.lr} if record.text_encoder_lr is None else {"lr": record.lr, "lr_text_encoder": record.text_encoder_lr}
        lrs |= {} if record.d_lr is None else {"d_lr": record.d_lr}
        self.log({"step": record.step, "epoch": record.epoch, "loss": loss, "loss_average": self.smoothed, **lrs, "grad_norm": norm})
        if self.main:
            self.progress.set_postfix(loss=f"{self.smoothed:.4f}", lr=f"{record.lr:.2e}", s_it=f"{record.seconds:.2f}")

    def on_step_end(self, state: loop.TrainState) -> None:
        self.state = state
        if self.main:
            self.progress.update(1)
            if state.step == self.first_step:  # the estimate printed before training had no activations in it
                self.progress.write(f"after step {state.step}, {memory.describe_peak(self.acc.device)}")
        c, step = self.config, state.step
        before_end = step < self.total_steps  # the end's grid and file come after the loop (train.py)
        ended = self.epoch_ended(state)
        if self.validation_items and (step % c.validate_every == 0 or not before_end):
            self.validate(step)
        by_step = bool(c.sample_every) and step % c.sample_every == 0 and before_end
        by_epoch = bool(ended and c.sample_every_epochs) and ended % c.sample_every_epochs == 0 and before_end
        if by_step or by_epoch:
            self.sample(step, epoch=ended if by_epoch else None, by_step=by_step)
        if before_end:  # as kohya: the last step's weights are the final <name>.safetensors, not also a step or epoch file
            self.save_scheduled_files(state, ended)
        if c.save_state_every and step % c.save_state_every == 0:
            self.save_state(state)

    def save_scheduled_files(self, state: loop.TrainState, ended: int | None) -> None:
        """The --save-every and --save-every-epochs files due at `state`'s step (`ended`: the epoch that ended there)."""
        c, step = self.config, state.step
        if c.save_every and step % c.save_every == 0:
            self.save_scheduled(self.out / f"{c.output_name}-step{step:08d}.safetensors", state)
        if ended and c.save_every_epochs and ended % c.save_every_epochs == 0:
            self.save_scheduled(self.out / f"{c.output_name}-{ended:06d}.safetensors", state)

    def extend_finished_run(self, state: loop.TrainState, final: Path) -> None:
        """A resume past a finished run's end (a higher --max-steps or --epochs), whose `final` file holds the weights
        of the resumed step: that step's scheduled files, left out then (the final file had its weights), are written
        now, since this run's own final file replaces that one; so is its epoch grid, which was the end's grid."""
        if final_file_step(final) != state.step:
            return
        ended = state.epoch if state.epoch and not state.batch_in_epoch else None
        self.save_scheduled_files(state, ended)
        if ended and self.config.sample_every_epochs and ended % self.config.sample_every_epochs == 0:
            self.sample(state.step, epoch=ended, by_step=False)  # (its step grid is the old end's, same name)

    def records_numbers_at(self, step: int) -> bool:
        return bool(self.config.save_state_every) and step % self.config.save_state_every == 0

    def epoch_ended(self, state: loop.TrainState) -> int | None:
        """The epoch (counted from 1, kohya's file number) that ended with the step `state` holds, once; None
        within an epoch. The loop moves `state.epoch` on at an epoch's last batch, before this hook. An epoch
        whose last step was skipped (--nan-skip) ends at the next step taken."""
        if state.epoch <= self.epochs_done:
            return None
        self.epochs_done = state.epoch
        return state.epoch

    def on_skipped_step(self, record: loop.StepRecord, nan_steps: int) -> None:
        self.log({"step": record.step, "skipped": True, "loss": record.loss, "grad_norm": record.grad_norm})  # log: NaN as "nan"
        if self.main:
            self.progress.write(f"warning: step {record.step} skipped: non-finite loss ({record.loss}) or gradient norm "
                                f"({record.grad_norm}); {nan_steps} of --nan-skip {self.config.nan_skip} used")

    def should_stop(self) -> bool:
        if self.acc.num_processes == 1:
            self.stopped = self.stop.requested  # a host flag: asking costs the device nothing
        else:  # every rank stops at the same step, also the ranks that got no signal
            self.stopped = self.stop_vote(self.stop.requested)
        return self.stopped

    # --- outputs ---------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.main:
            record["elapsed"] = round(self.elapsed(), 3)
            record["rss_mb"] = round(self._process.memory_info().rss / 2**20, 1)  # flat over a long run, or a leak
            # NaN / inf as strings, as a skipped step writes them: bare NaN is not JSON, and strict readers refuse it.
            line = json.dumps({k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}, allow_nan=False)
            try:
                self.metrics.write(line + "\n")
            except OSError as e:
                raise UserError(f"could not write {self.out / 'metrics.jsonl'}: {e.strerror or e}; free some space or fix its permissions") from None
            if self.tensorboard:
                self.tensorboard.write(record["step"], tensorboard_log.scalars(record))

    def elapsed(self) -> float:
        """Seconds this run has trained, the processes before a resume included."""
        return self.elapsed_before + time.time() - self.process_started

    def validate(self, step: int) -> float:
        with eager():  # on every process: each runs its share of the images, all get the same mean
            value = validation_loss(self.trainee, self.objective, self.validation_items, self.config.batch_size)
        # A NaN never becomes the best: no later loss compares below it, so the best step would stay stuck there.
        if math.isfinite(value) and (self.best_validation is None or value < self.best_validation):
            self.best_validation, self.best_validation_step = value, step
        self.log({"step": step, "val_loss": value})
        if self.main:
            self.progress.write(f"step {step}: validation loss {value:.5f} (best {self.best_validation:.5f} at step {self.best_validation_step})")
        return value

    def _sampling(self):
        c, m = self.config, self.model
        kept = not self.trainee.conditioner.released  # else the prompts come encoded (encode_prompts)
        pipe = build_sampling_pipeline(
            vae=m.vae, text_encoder=m.text_encoder if kept else None, tokenizer=m.tokenizer, unet=m.unet,
            scheduler_config=m.scheduler_config, sampler=c.sample_sampler, text_encoder_2=m.text_encoder_2 if kept else None,
            tokenizer_2=m.tokenizer_2,
        )
        settings = SampleSettings(
            width=c.resolution, height=c.resolution, steps=c.sample_steps, cfg=c.sample_cfg,
            seeds=tuple(range(c.sample_seeds)), sampler=c.sample_sampler, clip_skip=c.clip_skip,
            max_token_length=c.max_token_length,
        )
        return pipe, settings

    def encode_prompts(self) -> None:
        """Encode the sample prompts once while the text encoders are frozen: they never change, every grid reuses
        them, and the text encoders need not stay in memory for sampling. A trained text encoder encodes them
        at each grid."""
        if self.main and self.config.sampling and not self.config.train_text_encoder:
            pipe, settings = self._sampling()
            self.conditioning = encode_prompts(pipe, self.prompts, settings)

    def sample(self, step: int, epoch: int | None = None, by_step: bool = True) -> None:
        """Draw the sample grid of step `step` and save it as <name>-stepNNNNNNNN.png (`by_step`) and, when
        `epoch` ended here, as <name>-NNNNNN.png (the epoch's LoRA file name): one drawing for both."""
        if not self.main or not self.config.sampling:
            return
        name = self.config.output_name
        pipe, settings = self._sampling()
        cells: list = []
        title = f"{name} - step {step}" + (f", end of epoch {epoch}" if epoch else "")
        try:
            with eager():  # no compile per grid size
                grid, log = generate_grid(pipe, self.prompts, settings, title=title, cells_out=cells, stop=lambda: self.stop.requested,
                                          conditioning=self.conditioning)
        except SamplingStopped:  # a Ctrl-C or SIGTERM: saving the LoRA comes first
            self.progress.write(f"samples at step {step} skipped: a stop was requested")
            return
        self.last_sampled = (step, cells)
        if step == 0:
            self.step_0_cells = cells
        # The log (per row: prompt, size, steps, cfg, seeds) travels in the PNG: a grid says how it was drawn.
        names = ([f"{name}-step{step:08d}.png"] if by_step else []) + ([f"{name}-{epoch:06d}.png"] if epoch else [])
        metadata = {"step": step, **({"epoch": epoch} if epoch else {}), **log}
        paths = [self._save_grid(grid, self.config.samples_dir / file_name, metadata=metadata) for file_name in names]
        self.grids.extend(paths)
        if self.tensorboard:
            self.tensorboard.image("samples", grid, step)
        self.progress.write(f"samples: {', '.join(map(str, paths))} ({json.dumps(log, default=str)})")

    def compare_with_base(self, step: int) -> Path | None:
        """The sample prompts on the same seeds without and with the LoRA, side by side: what the LoRA changed."""
        if not self.main or not self.config.sampling:
            return None
        if self.stop.requested:  # a Ctrl-C or SIGTERM during the end's saves: the run is saved, and stops now
            self.progress.write(f"base vs LoRA comparison at step {step} skipped: a stop was requested")
            return None
        pipe, settings = self._sampling()
        before = self.step_0_cells if self.base_at_step_0 else None  # LoRA starts as an exact no-op
        if before is None:
            models = [self.model.unet, *self.model.text_encoders]
            try:
                for model in models:
                    set_lora_enabled(model, False)
                with eager():  # no compile per grid size
                    before, _ = generate_images(pipe, self.prompts, settings, conditioning=self.conditioning)
            finally:
                for model in models:
                    set_lora_enabled(model, True)
        if self.last_sampled and self.last_sampled[0] == step:
            after = self.last_sampled[1]
        else:
            with eager():  # no compile per grid size
                after = generate_images(pipe, self.prompts, settings, conditioning=self.conditioning)[0]
        grid = side_by_side_grid(before, after, row_labels(self.prompts, settings), list(settings.seeds),
                                 title=f"{self.config.output_name} - step {step}: base | LoRA, same seeds")
        path = self._save_grid(grid, self.config.samples_dir / f"{self.config.output_name}-compare-step{step:08d}.png")
        self.grids.append(path)
        self.progress.write(f"base vs LoRA: {path}")
        return path

    def _save_grid(self, grid, path: Path, metadata: dict | None = None) -> Path:
        """`save_grid`; a write that fails (a full disk, permissions) is a `UserError` naming the file."""
        try:
            return save_grid(grid, path, metadata=metadata)
        except OSError as e:
            raise UserError(f"could not save {path}: {e.strerror or e}; free some space or fix the permissions of {path.parent}") from None

    def save_lora(self, path: Path, state: loop.TrainState) -> Path | None:
        return path if self._write_lora(path, state) else None

    def _write_lora(self, path: Path, state: loop.TrainState) -> list[Path]:
        """The LoRA files of `state` (the main process; the others write none): `path`, and with --format both
        its -diffusers sibling."""
        if not self.main:
            return []
        components = lora_components(self.model, self.config.train_text_encoder)
        meta = training_metadata(
            self.config, family=self.model.family, prediction_type=self.model.prediction_type,
            run_metadata=self.run_meta, started_at=self.started_at, step=state.step,
            epoch=state.epoch + (1 if state.batch_in_epoch else 0), total_steps=self.total_steps,
            total_epochs=self.total_epochs, targets=self.targets, processes=self.acc.num_processes,
            session_id=self.session_of(state.step),
        )
        if self.best_validation_step is not None:
            meta["ss_validation_loss_best"] = str(self.best_validation)
            meta["ss_validation_best_step"] = str(self.best_validation_step)
        try:
            written = export_lora(path, components, meta, self.config.save_precision, sgm_paths=sgm_paths(self.model),
                                  file_format=self.config.format)
        except OSError as e:
            raise UserError(f"could not save {path}: {e.strerror or e}. {self._rescue(state)}") from None
        self.saved.extend(written)
        self.weights_saved_at = state.step
        self.progress.write(f"saved {', '.join(map(str, written))}")
        return written

    def session_of(self, step: int) -> int | None:
        """ss_session_id of the weights at `step`: this process's for a step it trained; a resumed step's (a finished
        run extended, a stop before the first new step) are the earlier session's, as in kohya, whose id says which
        session a file's weights came from and which never writes an earlier session's step again."""
        return self.session_id if step > self.start_step else self.resumed_session

    def save_scheduled(self, path: Path, state: loop.TrainState) -> None:
        """An intermediate save of --save-every or --save-every-epochs. With --keep-saves K the files of this
        run's older scheduled saves beyond the newest K are then deleted: only once the new file is written
        (a failed save raises first), and only files this run wrote under its own names in --output-dir."""
        written = [p.resolve() for p in self._write_lora(path, state)]
        if not written:
            return
        # A name written again (a resume from an earlier state) is the newest save now, not also an old one.
        self.scheduled_saves = [s for s in self.scheduled_saves if not set(s) & set(written)] + [written]
        keep = self.config.keep_saves
        while keep and len(self.scheduled_saves) > keep:
            for old in self.scheduled_saves.pop(0):
                self._delete_save(old)

    def _delete_save(self, path: Path) -> None:
        own = is_run_save(self.config.output_name, path.name, intermediate_only=True)
        if not own or path.parent != self.out.resolve():  # (a resume into another --output-dir): never touched
            self.progress.write(f"warning: --keep-saves left {path} alone: it is not named as this run's saves in {self.out}")
            return
        try:
            path.unlink(missing_ok=True)  # already gone (deleted by hand): nothing to do
        except OSError as e:
            self.progress.write(f"warning: --keep-saves could not delete {path}: {e.strerror or e}; delete it by hand")
            return
        self.progress.write(f"deleted {path} (--keep-saves {self.config.keep_saves})")

    def _rescue(self, state: loop.TrainState) -> str:
        """After a LoRA file could not be written: keep the weights in a training state if that can still be
        written (another folder, another file name), and say how to get the file from it."""
        try:
            path = self.save_state(state, all_processes=False)  # only the main process is here
        except UserError as e:
            older = checkpoint.list_states(self.out)
            kept = f"the newest training state is {older[-1]}" if older else "no training state was saved before"
            return f"Could not keep the weights in a training state either ({e}); earlier files are intact, and {kept}."
        return (f"The weights are kept in the training state {path}: free space, fix permissions or move what is in "
                f"the way, then {checkpoint.resume_command(self.config.output_dir, self.acc.num_processes)} writes the file.")

    def rng_states(self, all_processes: bool = True) -> list[dict]:
        """The random states of every process in rank order (gathered: with several processes every one must
        call this), or with `all_processes` False the main process's alone."""
        mine = checkpoint.rng_states(self.trainee.generator)
        if self.acc.num_processes == 1 or not all_processes:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    def save_state(self, state: loop.TrainState, all_processes: bool = True) -> Path | None:
        """Write a training state (the main process). With `all_processes` every process must call this, and each
        one's random states are kept; False (a save by the main process alone) keeps the main process's only."""
        rng = self.rng_states(all_processes)
        if not self.main:
            return None
        modules = trained_modules(self.model, self.config.train_text_encoder)
        progress = checkpoint.Progress(
            step=state.step, epoch=state.epoch, batch_in_epoch=state.batch_in_epoch, nan_steps=state.nan_steps,
            best_validation=self.best_validation, best_validation_step=self.best_validation_step, log_run=self.log_run,
            loss_average=self.smoothed, started_at=self.started_at, elapsed=self.elapsed(),
            saves=[[str(p) for p in save] for save in self.scheduled_saves], processes=self.acc.num_processes,
            session_id=self.session_of(state.step),
        )
        after = state.step if self.states_after is None else self.states_after
        later = checkpoint.later_states(self.out, after)  # set aside by save_state: another run's (its docstring)
        aside = [checkpoint.set_aside_name(p).name for p in later]
        try:
            path = checkpoint.save_state(
                self.out, progress=progress, modules=modules, optimizer=self.trainee.optimizer, lr_scheduler=self.trainee.lr_scheduler,
                rng=rng, config=self.config, data_fingerprint=self.data_fingerprint, keep=self.config.keep_states, after=after,
            )
        except OSError as e:
            raise UserError(f"could not save the training state in {self.out}: {e.strerror or e}. Earlier states are intact; free some "
                            "space or fix the folder's permissions before the next run") from None
        self.weights_saved_at, self.states_after = state.step, None
        if later:
            self.progress.write(f"moved {', '.join(p.name for p in later)} aside to {', '.join(aside)}: states after step {after}, "
                                "where this run started, left by another run (delete them if you do not need them)")
        self.progress.write(f"saved training state {path}")
        return path

    def close(self) -> None:
        """Safe to call more than once (the error paths close before they re-raise)."""
        self.progress.close()
        if self.main:
            try:
                self.metrics.close()
            except OSError:  # the line it could not flush failed to write first, and that error is the one reported
                pass
            if self.tensorboard:
                self.tensorboard.close()
