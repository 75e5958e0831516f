"""`python -m sd_lora.train`: build everything a run needs, then hand it to the loop.

Order matters and is the user-visible contract: validate every option (before any model loads), load the
model, scan and check every image, inject LoRA, cache latents, print a summary, then train. Outputs go to
`--output-dir`: `<name>.safetensors`, `<name>-stepNNNNNNNN.safetensors`, `<name>-NNNNNN.safetensors` (epochs),
`config.toml`, `metrics.jsonl`, `samples/*.png` (and with `--log-with tensorboard`, TensorBoard events under
`--logging-dir`, default `logs/`). Only the main process writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # hack: see sd_lora.demo.pretrain (before torch loads)

import psutil  # noqa: E402
import torch  # noqa: E402

from . import checkpoint, loop, memory, tensorboard_log  # noqa: E402
from .compiling import check_compiler  # noqa: E402
from .config import TrainConfig, load_config, output_name_length_problem  # noqa: E402
from .demo.defaults import announce_demo, is_demo_base  # noqa: E402
from .options import DEFAULT_RANK  # noqa: E402
from .data import ImageDataset, build_latent_cache, dataset_metadata, fingerprint, image_warnings, reg_dataset_metadata  # noqa: E402
from .data.latent_cache import vae_identity  # noqa: E402
from .data_setup import (Prefetch, build_validation, data_loader, data_options, regularization_set, scan_training_data, split_validation,  # noqa: E402
                         stop_workers, vae_encoder)
from .errors import Interrupted, UserError, is_secondary_process, run_cli  # noqa: E402
from .export import trained_modules  # noqa: E402
from .outputs import RunOutputs, StopRequest, is_run_save  # noqa: E402
from .lora.inject import trainable_parameters  # noqa: E402
from .lora.targets import matching_preset  # noqa: E402
from .models.conditioning import Conditioner  # noqa: E402
from .models.load import BaseModel, is_checkpoint_file, load_base_model  # noqa: E402
from .models.single_file import webui_hashes  # noqa: E402
from .optim import build_lr_scheduler, build_optimizer, check_available, restore_lr_scheduler  # noqa: E402
from .precision import choose_mixed_precision, probe_hardware  # noqa: E402
from .preflight import (check_epoch_schedules, check_zero_snr_samplers, check_free_space, check_output_dir, check_precision, check_xformers,  # noqa: E402
                        read_sample_prompts, remove_abandoned_saves, summary, warn_long_captions, warn_long_sample_prompts)
from .sampling.prompts import SIZE_STEP, default_prompts  # noqa: E402
from .trainee_setup import (WEIGHT_DTYPES, cache_text_conditioning, check_step_memory, cpu_threads, make_accelerator, release_text_encoders,  # noqa: E402
                            prepare_models, read_init_weights)

DEFAULT_EPOCHS = 10


# --- set-up (the checks that need no model: preflight.py) ---------------------------------------------


def process_state():
    """Which process this is (accelerate's PartialState), before the Accelerator exists: its mixed precision
    is only known once the model is loaded (`--mixed-precision auto`)."""
    from accelerate.state import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def mixed_precision_for(config: TrainConfig, unet_parameters: int) -> str:
    """--mixed-precision resolved for this machine and a U-Net of this size ("auto" decided; see precision.py)."""
    return choose_mixed_precision(config.mixed_precision, probe_hardware(), unet_parameters)


def may_write(config: TrainConfig, path: Path) -> bool:
    """Whether the run may save a LoRA file at `path`: its final file, an intermediate (--save-every, --save-every-epochs,
    Ctrl-C, last good step) or one's -diffusers sibling, all <output-name>...safetensors in --output-dir."""
    path = Path(path).resolve()
    return is_run_save(config.output_name, path.name) and path.parent == Path(config.output_dir).resolve()


def resolve_defaults(config: TrainConfig, model: BaseModel) -> TrainConfig:
    """Fill the options whose default depends on the model, data or hardware; check them against the model."""
    resolution = config.resolution or model.native_resolution
    step = model.bucket_step
    problems = []
    if resolution % step:
        problems.append(f"--resolution {resolution} must be a multiple of {step} px for this model (e.g. {max(step, round(resolution / step) * step)})")
    min_side = config.min_bucket_side or max(step, resolution // 2 // step * step)
    max_side = config.max_bucket_side or resolution * 2
    for flag, value in (("--min-bucket-side", config.min_bucket_side), ("--max-bucket-side", config.max_bucket_side)):
        if value is not None and value % step:
            problems.append(f"{flag} {value} must be a multiple of {step} px for this model")
    if config.resolution is None:  # (against a --resolution the user set, config.validate checked them)
        if min_side > resolution:
            problems.append(f"--min-bucket-side {min_side} is larger than this model's resolution {resolution} (its native size; "
                            f"--resolution was not set); use at most {resolution}, or set --resolution")
        if max_side < resolution:
            problems.append(f"--max-bucket-side {max_side} is smaller than this model's resolution {resolution} (its native size; "
                            f"--resolution was not set); use at least {resolution}, or set --resolution")
    if config.zero_terminal_snr and model.prediction_type != "v_prediction":
        problems.append("--zero-terminal-snr needs a v-prediction model (at zero SNR an epsilon model has nothing to "
                        "predict from); use a v-prediction model or pass --prediction-type v_prediction deliberately")
    # The hidden state conditioning the U-Net must be a layer's output: SD1/SD2 count from the last layer, SDXL
    # from the penultimate one (models/conditioning.py).
    layers = min(e.config.num_hidden_layers for e in model.text_encoders) - (model.family == "sdxl")
    if config.clip_skip > layers:
        problems.append(f"--clip-skip {config.clip_skip}: this model's text encoder has {layers} usable layers for it; use 1 to {layers}")
    if config.sampling and resolution % SIZE_STEP:
        off = "--sample-every 0" + (" --sample-every-epochs 0" if config.sample_every_epochs else "")
        problems.append(f"--resolution {resolution}: sample grids need a multiple of {SIZE_STEP} px; change it or pass {off}")
    output_name = config.output_name or (config.data or config.dataset_config.with_suffix("")).resolve().name.lstrip(".") or "lora"  # never hidden
    if not config.output_name and (problem := output_name_length_problem(output_name)):
        problems.append(f"the output name {output_name[:20]!r}... (the data folder's name; --output-name was not set) is {problem}; "
                        "pass a shorter --output-name")
    if problems:
        raise UserError("\n".join(problems))
    return dataclasses.replace(
        config,
        resolution=resolution,
        min_bucket_side=min_side,
        max_bucket_side=max_side,
        output_name=output_name,
        prediction_type=model.prediction_type,
        # With --init-weights the file decides the LoRA's shape (read_init_weights); without, the defaults.
        **({} if config.init_weights else {"rank": config.rank or DEFAULT_RANK, "train_text_encoder": bool(config.train_text_encoder)}),
        model=model.name,
        cache_latents=config.use_latent_cache,
        mixed_precision=mixed_precision_for(config, sum(p.numel() for p in model.unet.parameters())),
    )


# --- the run --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    path: Path  # the final .safetensors
    config: TrainConfig  # resolved
    state: loop.TrainState
    unet: torch.nn.Module  # trained, with LoRA layers (unwrapped)
    text_encoders: list[torch.nn.Module]  # trained ones with LoRA; frozen ones whose outputs were cached are released (meta)
    outputs: RunOutputs

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]


def skip_steps_on_device(device: torch.device, optimizer) -> bool:
    """On a GPU with the fused AdamW (the default there) the optimizer skips a non-finite step itself, so no
    step waits for the device (`loop.train`'s `skip_on_device`). On the CPU waiting costs nothing, and the
    host check keeps a skipped step out of the schedule."""
    return device.type == "cuda" and loop.supports_skip_on_device(optimizer)


def run(config: TrainConfig) -> TrainResult:
    """Train one LoRA and write its files; returns them and the trained modules."""
    with cpu_threads(config.threads):
        return train_lora(config)


def train_lora(config: TrainConfig) -> TrainResult:
    check_precision(config)
    check_xformers(config)
    check_available(config.optimizer, torch.device("cuda" if torch.cuda.is_available() else "cpu"))  # the Accelerator's choice
    tensorboard_log.check_available(config)
    if config.compile != "off":
        check_compiler(torch.cuda.is_available())
    process = process_state()
    memory.reset_peak(process.device)  # the CUDA peak this run reports counts from here
    if is_demo_base(config.model):
        announce_demo(config, show=process.is_main_process)
    # Everything that needs no model is checked first: a Hub model may take long to download.
    file_prompts = read_sample_prompts(config)
    check_output_dir(config.output_dir)
    samples = config.samples_dir
    if config.sampling and samples.exists() and not samples.is_dir():  # found now, not at the first grid (steps in after a resume)
        raise UserError(f"{samples} is a file, but the sample grids are saved in a folder of that name; rename or remove it")
    if config.latent_cache_dir is not None:
        check_output_dir(config.latent_cache_dir, "--latent-cache-dir")
    if config.log_with == "tensorboard":
        check_output_dir(tensorboard_log.logging_dir(config), "--logging-dir")
    if process.is_main_process and (finished := checkpoint.finish_swaps(config.output_dir)):
        print(finished)  # first: a state a killed re-save left only under its .replaced name is back before anything looks
    if process.is_main_process and (removed := remove_abandoned_saves(config, started=psutil.Process().create_time())):
        print(removed)  # (only the main process writes files)
    if config.resume:
        process.wait_for_everyone()  # every rank looks for the state to resume only once the main process put it back
    scan = scan_training_data(config)
    for warning in scan.warnings if process.is_main_process else []:
        print(f"warning: {warning}", file=sys.stderr)
    train_records, validation_records = split_validation(config, scan, show=process.is_main_process)
    prior_records, reg_found = regularization_set(config, train_records, show=process.is_main_process)
    model = load_base_model(
        config.model, prediction_type=config.prediction_type, vae=config.vae, zero_terminal_snr=config.zero_terminal_snr,
        allow_unsafe_pickle=config.allow_unsafe_pickle, model_config=str(config.model_config) if config.model_config else None,
        dtype_for=lambda unet_parameters: WEIGHT_DTYPES[mixed_precision_for(config, unet_parameters)],
    )
    config = resolve_defaults(config, model)  # records the same mixed precision in the config
    if model.family == "sdxl" and config.clip_skip > 1 and process.is_main_process:  # a kohya SDXL command copied over
        print(f"warning: --clip-skip {config.clip_skip} on SDXL conditions on hidden state {config.clip_skip + 1} from the end: "
              "SDXL already uses the penultimate at 1. kohya ignores --clip_skip for SDXL, so to train as it does, drop "
              "--clip-skip", file=sys.stderr)
    check_zero_snr_samplers(config, file_prompts, model.scheduler_config)
    final = config.output_dir / f"{config.output_name}.safetensors"
    if final.is_dir():  # found now, not when the trained weights are to be written
        raise UserError(f"{final} is a folder, but the trained LoRA is saved under that name; rename or remove it, or pass another --output-name")
    if final.is_file() and not config.resume and process.is_main_process:  # as kohya, replaced; but not without a word
        print(f"warning: {final} is an earlier run's; this run replaces it when it ends, with its step files and sample grids "
              "of the same names. To keep them, pass another --output-name or --output-dir", file=sys.stderr)
    elif (config.output_dir / "config.toml").is_file() and not config.resume and process.is_main_process:
        print(f"warning: {config.output_dir} holds an earlier run's config.toml and metrics.jsonl (one per folder); this run "
              "replaces them as it starts (the earlier LoRA files stay). To keep them, pass another --output-dir", file=sys.stderr)
    if config.init_weights is not None and may_write(config, config.init_weights):
        raise UserError(f"--init-weights {config.init_weights} is named as this run's own saves in {config.output_dir}, so training "
                        "would overwrite it; copy it elsewhere first, or pass another --output-name or --output-dir")
    if process.is_main_process:
        warn_long_captions(model.tokenizer, [r.caption for r in train_records + prior_records + validation_records],
                           config.max_token_length)
        if file_prompts and config.sampling:
            warn_long_sample_prompts(model.tokenizer, file_prompts, config.max_token_length, config.sample_prompts)
    init_weights, targets = None, config.targets
    if config.init_weights:  # before the resume check: the file's rank and alpha are part of the run
        config, init_weights = read_init_weights(config, model)  # (and whether the text encoder trains)
        if init_weights.get("unet"):  # and its U-Net modules, whatever --targets says: the saved files name their preset
            preset = matching_preset(model.unet, init_weights["unet"])
            config = dataclasses.replace(config, targets=preset or config.targets)
            targets = preset or "custom"
            if preset is None and process.is_main_process:
                print(f"note: the --init-weights file's {len(init_weights['unet'])} U-Net modules are no --targets preset's; "
                      "they train as they are, recorded as targets 'custom'")
    accelerator = make_accelerator(config, unused_lora=config.train_text_encoder and (model.family == "sdxl" or config.clip_skip > 1))
    options = data_options(config, model.bucket_step)
    dataset = ImageDataset(train_records + prior_records, options)
    data_id = fingerprint(train_records + prior_records + validation_records)
    resumed = None
    if config.resume:
        resumed = checkpoint.load_state(checkpoint.resolve_resume(config.resume, config.output_dir), config, data_id,
                                        processes=accelerator.num_processes)

    # Models: frozen base in the compute dtype, LoRA in fp32, seeded initialisation (the same on every process).
    torch.manual_seed(config.seed)
    weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
    trainable = prepare_models(config, model, accelerator.device, weight_dtype, init_weights,
                               batch_shapes=2 * len(dataset.bucket_counts()))  # each bucket's full and short batch
    checkpoint.seed_process(config.seed, accelerator.process_index)  # then each process its own dropout masks
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)

    if config.cache_latents:
        # Its own generator: whether entries come from disk or are encoded now never shifts the training draws.
        encode = vae_encoder(model, accelerator, torch.Generator(device=accelerator.device).manual_seed(config.seed + 2))
        disk = {}
        if config.latent_cache_dir is not None:
            weights = {**model.vae.encoder.state_dict(), **{f"quant_conv.{k}": v for k, v in model.vae.quant_conv.state_dict().items()}}
            dtype = f"{model.vae.dtype}/autocast-{config.mixed_precision}"  # what the latents were computed in
            disk = {"cache_dir": config.latent_cache_dir, "vae_id": vae_identity(model.vae_name or model.name, model.vae.config, dtype, weights)}
        # With several processes and a disk cache the main one writes, the others then read; in memory, each
        # process encodes at once (the same latents: the same seeded generator), not one after another.
        with accelerator.main_process_first() if disk else contextlib.nullcontext():
            dataset.latent_cache = build_latent_cache(dataset, encode, batch_size=config.batch_size, progress=accelerator.is_main_process, **disk)
        for warning in dataset.latent_cache.warnings if accelerator.is_main_process else []:
            print(f"warning: {warning}", file=sys.stderr)
        if config.latent_cache_dir is not None and accelerator.is_main_process:
            cache = dataset.latent_cache
            print(f"latent cache {config.latent_cache_dir}: {cache.reused} latents read from it, {cache.encoded} encoded")
    validation_items = build_validation(config, model, accelerator, validation_records, options)
    if config.cache_latents:  # every latent the run needs is encoded: only the decoder (for samples) stays
        freed = memory.release_vae_encoder(model.vae)
        if accelerator.is_main_process:
            print(f"latents cached: VAE encoder released ({freed / 2**20:.1f} MiB)")

    dataloader = data_loader(config, dataset, accelerator)
    batch_sampler = dataloader.batch_sampler
    per_epoch = loop.steps_per_epoch(len(batch_sampler), config.gradient_accumulation_steps)
    total_steps = config.max_steps or per_epoch * (config.epochs or DEFAULT_EPOCHS)
    epochs = math.ceil(total_steps / per_epoch)
    if config.lr_warmup_steps > total_steps:
        raise UserError(f"--lr-warmup-steps {config.lr_warmup_steps} is longer than the run ({total_steps} steps: {per_epoch} per epoch x "
                        f"{epochs} epochs); use at most {total_steps}, or train longer with more --epochs or a --max-steps")
    check_epoch_schedules(config, per_epoch, total_steps)
    n_params = sum(p.numel() for p in trainable)
    file_bytes = n_params * {"fp32": 4, "fp16": 2, "bf16": 2}[config.save_precision]
    # A training state holds the fp32 LoRA weights and the optimizer's state (Prodigy's is twice AdamW's).
    state_bytes = sum(p.numel() * p.element_size() + memory.optimizer_state_bytes(config.optimizer, p.shape, p.element_size()) for p in trainable)
    check_free_space(config.output_dir, 64 * 2**20 + file_bytes * 4 + state_bytes * config.keep_states)

    groups = [{"params": trainable_parameters(model.unet), "lr": config.learning_rate}]
    if config.train_text_encoder:
        te_params = [p for e in model.text_encoders for p in trainable_parameters(e)]
        groups.append({"params": te_params, "lr": config.effective_text_encoder_lr})
    optimizer = build_optimizer(config.optimizer, groups, weight_decay=config.weight_decay, device=accelerator.device)
    lr_scheduler = build_lr_scheduler(config.lr_scheduler, optimizer, warmup_steps=config.lr_warmup_steps, total_steps=total_steps,
                                      num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power)
    # `model` keeps the plain modules (for saving and sampling); the loop gets the prepared ones (DDP-wrapped
    # with several processes).
    text_encoders = list(model.text_encoders)
    if config.train_text_encoder:
        unet, *text_encoders, optimizer = accelerator.prepare(model.unet, *model.text_encoders, optimizer)
    else:
        unet, optimizer = accelerator.prepare(model.unet, optimizer)

    state = loop.TrainState()
    if resumed:
        modules = trained_modules(model, config.train_text_encoder)
        checkpoint.restore_trainable(modules, resumed.tensors)
        optimizer.load_state_dict(resumed.training["optimizer"])
        restore_lr_scheduler(lr_scheduler, resumed.training["lr_scheduler"])
        if accelerator.scaler is not None and "scaler" in resumed.training:  # fp16: the loss scale reached
            accelerator.scaler.load_state_dict(resumed.training["scaler"])
        exact = checkpoint.restore_rng_states(resumed.training["rng"], generator, rank=accelerator.process_index, seed=config.seed,
                                              step=resumed.progress.step)
        p = resumed.progress
        state = loop.TrainState(step=p.step, epoch=p.epoch, batch_in_epoch=p.batch_in_epoch, nan_steps=p.nan_steps)
        # A state at the last step is a finished run whose final file could not be written: resuming writes it.
        if state.step > total_steps or (state.step == total_steps and final.exists()):
            raise UserError(f"--resume {resumed.path}: the run already has {state.step} steps; raise --max-steps or --epochs to extend it")

    conditioner = Conditioner(model.family, model.tokenizers, text_encoders, config.clip_skip,
                              cache_outputs=not config.train_text_encoder and not config.shuffle_tags and not config.tag_dropout,
                              max_tokens=config.max_token_length)
    drawn = [r.caption for r in dataset.records] + [v.caption for v in validation_items] + [""] * (config.caption_dropout > 0)
    cache_text_conditioning(conditioner, drawn, accelerator, weight_dtype)  # then the text encoders go, once the sample prompts are encoded
    prompts = file_prompts or default_prompts([r.caption for r in train_records])
    if accelerator.is_main_process:
        cache_bytes = dataset.latent_cache.memory_bytes() if dataset.latent_cache is not None else 0
        placed = [model.unet, model.vae, *([] if conditioner.cache_outputs else model.text_encoders)]
        print(memory.describe_estimate(memory.estimate(placed, trainable, cache_bytes, config.optimizer, conditioner.cache_bytes())))
        print(summary(config, scan, dataset, len(batch_sampler), per_epoch, total_steps, epochs, n_params, model,
                      len(validation_records), accelerator.num_processes, targets))
        if resumed:
            print(f"resuming from {resumed.path} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
            if note := checkpoint.rng_note(resumed, accelerator.num_processes):
                print(f"note: {note}")
            elif not exact:
                print(f"note: {resumed.path} was saved on another kind of device (CPU or CUDA GPU), whose random generator this "
                      "one cannot continue: noise and timesteps are drawn afresh from here, so the run will not match an "
                      "uninterrupted one exactly")

    trainee = loop.Trainee(
        accelerator=accelerator, unet=unet, text_encoders=text_encoders,
        conditioner=conditioner, vae=None if config.cache_latents else model.vae,
        dataloader=Prefetch(dataloader) if config.num_workers == 0 and not config.cache_latents else dataloader,
        batch_sampler=batch_sampler, optimizer=optimizer, lr_scheduler=lr_scheduler, trainable=trainable,
        train_text_encoder=config.train_text_encoder, weight_dtype=weight_dtype,
        max_grad_norm=config.max_grad_norm, generator=generator,
    )
    objective = loop.Objective(
        alphas_cumprod=model.alphas_cumprod.to(accelerator.device), num_train_timesteps=model.num_train_timesteps,
        prediction_type=model.prediction_type, vae_scaling_factor=float(model.vae.config.scaling_factor), noise_offset=config.noise_offset,
        min_snr_gamma=config.min_snr_gamma, prior_loss_weight=config.prior_loss_weight,
    )
    run_meta = {**dataset_metadata(train_records, reg_found), **reg_dataset_metadata(reg_found),
                "ss_bucket_info": json.dumps(dataset.bucket_info()),
                "ss_num_batches_per_epoch": str(len(batch_sampler)),  # kohya's: one process's batches
                "ss_num_validation_images": str(len(validation_records))}
    if is_checkpoint_file(config.model) and accelerator.is_main_process:  # as kohya; a diffusers folder or Hub id has none
        run_meta.update(webui_hashes(Path(config.model).expanduser()))
    # image_warnings.collect: the batches decode the images again (in this process without --num-workers), and Pillow's
    # warnings about their metadata, which the scan reported, are dropped.
    with StopRequest() as stop, image_warnings.collect():
        outputs = RunOutputs(
            config, model, accelerator, trainee=trainee, objective=objective, run_meta=run_meta,
            prompts=prompts, total_steps=total_steps, total_epochs=epochs, targets=targets, start_step=state.step, data_fingerprint=data_id,
            validation_items=validation_items, stop=stop, progress=resumed.progress if resumed else None,
        )
        if resumed and final.exists():
            outputs.extend_finished_run(state, final)
        outputs.encode_prompts()
        release_text_encoders(conditioner, show=accelerator.is_main_process)
        try:
            fits = check_step_memory(trainee, objective, dataset, config.batch_size, config.seed)  # before anything slow
            if accelerator.is_main_process:
                outputs.progress.write(fits)
            if not resumed:
                outputs.sample(0)  # the untouched base: LoRA starts as an exact no-op
            try:
                state = loop.train(
                    trainee, objective, state, max_steps=total_steps, hooks=outputs,
                    gradient_accumulation_steps=config.gradient_accumulation_steps, nan_skip=config.nan_skip,
                    check_gradients=config.mixed_precision != "fp16",  # fp16's loss scaler skips overflowing steps itself
                    skip_on_device=skip_steps_on_device(accelerator.device, optimizer),
                )
            except UserError as e:  # from this process's share of the data (an image that no longer loads): its own
                e.every_process = False
                raise
            finally:
                stop_workers(dataloader)
        except loop.NonFiniteLoss as e:
            stopped = loop.TrainState(step=e.weights_step, epoch=outputs.state.epoch, batch_in_epoch=outputs.state.batch_in_epoch)
            path = outputs.save_lora(config.output_dir / f"{config.output_name}-step{stopped.step:08d}-last-good.safetensors", stopped)
            outputs.close()
            accelerator.wait_for_everyone()  # see below: no rank exits before the main process has saved
            raise UserError(
                f"training stopped at step {e.step}: the loss or a gradient became NaN/inf ({e}). The last good weights "
                f"were saved {f'to {path}' if path else 'by the main process'}. Likely causes: a learning rate too high (try half of {config.learning_rate:g}), "
                "fp16 overflow (try --mixed-precision bf16 or a fp16-safe VAE), or a bad image. "
                "--nan-skip N skips up to N such steps instead of stopping."
            ) from None
        except KeyboardInterrupt:  # a second Ctrl-C: abort without saving
            outputs.close()
            raise Interrupted("aborted by a second Ctrl-C; nothing was saved after the last checkpoint", 130) from None
        except Exception as e:
            if not memory.is_out_of_memory(e):
                keep_trained_lora(config, state, outputs)  # a failed write or a crash in a hook loses no trained step
                outputs.close()  # what was logged is flushed; the event file and metrics.jsonl end cleanly
                raise
            out_of_memory = f"{type(e).__name__}: {str(e).splitlines()[0][:240]}"
        else:
            out_of_memory = None
        if out_of_memory:  # outside the handler, so the failed step's tensors (held by the traceback) are gone
            raise out_of_memory_error(config, state, trainee, outputs, accelerator.device, out_of_memory)
        if outputs.stopped and state.step < total_steps:  # decided by every process, not only those signalled
            lora = outputs.save_lora(config.output_dir / f"{config.output_name}-step{state.step:08d}.safetensors", state)
            state_dir = outputs.save_state(state)
            outputs.close()
            # A launcher (torchrun) stops every process once one exits: the others wait for the main one's saves.
            accelerator.wait_for_everyone()
            cause = signal.Signals(stop.signal).name if stop.signal else "a signal to another process"
            saved = (f"Saved {lora} and the training state {state_dir}." if accelerator.is_main_process else
                     "The main process saved the LoRA and the training state.")
            raise Interrupted(f"stopped by {cause} at step {state.step} of {total_steps}. {saved}\nTo continue: {checkpoint.resume_command(config.output_dir, accelerator.num_processes)}",
                              128 + (stop.signal or signal.SIGTERM))
        # Still under the StopRequest: a Ctrl-C or SIGTERM now lets the final file and state be written, then skips
        # the end's grids (without it, a Ctrl-C aborted the final save, and the steps since the last save were lost).
        accelerator.wait_for_everyone()
        try:  # the logs are closed even when the final file cannot be written
            outputs.save_lora(final, state)
            if config.save_state_every and state.step % config.save_state_every:  # as kohya's --save_state, the end too:
                outputs.save_state(state)  # extending the run (--resume latest, a larger --max-steps) continues from here
            outputs.sample(state.step)
            outputs.compare_with_base(state.step)
        finally:
            outputs.close()
    if accelerator.is_main_process:
        if state.nan_steps:  # over the whole run, resumed parts included
            skipped = "1 step was" if state.nan_steps == 1 else f"{state.nan_steps} steps were"
            print(f"warning: {skipped} skipped for a non-finite loss or gradient (--nan-skip {config.nan_skip})", file=sys.stderr)
        if outputs.best_validation_step is not None:
            print(f"best validation loss {outputs.best_validation:.5f} at step {outputs.best_validation_step}")
        print(memory.describe_peak(accelerator.device))
        print(f"done: {final}")
    return TrainResult(final, config, state, model.unet, model.text_encoders, outputs)


def keep_trained_lora(config: TrainConfig, state: loop.TrainState, outputs: RunOutputs) -> None:
    """After an error that ends training (a write that failed, a crash in sampling or validation, an image that no
    longer loads): save the LoRA of the last completed step, unless this process already wrote its weights, and
    say so before the error is reported. A save that fails as well is reported, never raised over the error."""
    if state.step < outputs.first_step or outputs.weights_saved_at == state.step:  # nothing trained since the last save
        return
    try:
        path = outputs.save_lora(config.output_dir / f"{config.output_name}-step{state.step:08d}.safetensors", state)
    except UserError as e:
        outputs.progress.write(f"the LoRA of step {state.step} could not be saved either: {e}", file=sys.stderr)
        return
    if path:
        outputs.progress.write(f"the run stopped on an error (below); the LoRA of step {state.step}, the last one completed, was saved "
                               f"to {path}; --init-weights {path} starts a new run from it", file=sys.stderr)


def out_of_memory_error(config: TrainConfig, state: loop.TrainState, trainee: loop.Trainee, outputs: RunOutputs,
                        device: torch.device, message: str) -> UserError:
    """Save the LoRA of the last completed step and say which settings would fit (the error to raise)."""
    trainee.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    saved = " Nothing had been trained yet."
    if state.step > 0:
        path = outputs.save_lora(config.output_dir / f"{config.output_name}-step{state.step:08d}.safetensors", state)
        saved = f" The LoRA of step {state.step} was saved to {path}; --init-weights {path} starts a new run from it."
    outputs.close()
    ways = memory.ways_to_fit(
        batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
        gradient_checkpointing=config.gradient_checkpointing, mixed_precision=config.mixed_precision, optimizer=config.optimizer,
        train_text_encoder=config.train_text_encoder, resolution=config.resolution or outputs.model.native_resolution,
        device_type=device.type,
    )
    advice = "\nTo fit, change one or more of: " + "; ".join(ways) if ways else ""
    error = UserError(f"out of {device.type} memory in step {state.step + 1} ({message}).{saved}{advice}\n{memory.describe_peak(device)}")
    error.every_process = False  # one process may run out of memory alone
    return error


def main(argv: list[str] | None = None) -> int:
    def train() -> None:
        warnings: list[str] = []
        config = load_config(argv, warnings)
        for warning in [] if is_secondary_process() else warnings:
            print(f"warning: {warning}", file=sys.stderr)
        run(config)

    return run_cli(train)


if __name__ == "__main__":
    sys.exit(main())
