"""The one training loop every stage uses: poly LR, AMP, checkpoints each epoch, resume.

A stage supplies a model, a dataset, parameter groups with LR multipliers and a `step`
function (model, batch) -> (loss, logs). The loop owns everything else, so that resume,
mixed precision and progress reporting behave the same in every stage.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from data.errors import WssError
from data.layout import json_text, write_text_atomic
from data.workers import loader_worker_init
from stages.base import StageInputError
from stages.common import distributed, run_log
from stages.common.elapsed import mark_elapsed
from stages.common.model_files import Checkpoint, load_weights, read_checkpoint_file, read_model_file, write_checkpoint
from stages.common.runtime import autocast, worker_count

log = logging.getLogger("wss.train")
CHECKPOINT = "checkpoint.safetensors"


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    workers: int = 0
    seed: int = 0
    log_every: int = 10  # steps between progress-bar updates (each one waits for the GPU)


def train_settings(section, run, batch_size: int | None = None) -> TrainSettings:
    """The TrainSettings of a stage's config section (epochs, batch_size, optimizer, lr, momentum,
    weight_decay) and of `run` (workers, seed); `batch_size` overrides the section's."""
    return TrainSettings(
        epochs=section.epochs,
        batch_size=batch_size or section.batch_size,
        lr=section.lr,
        optimizer=section.optimizer,
        momentum=section.momentum,
        weight_decay=section.weight_decay,
        workers=worker_count(run.workers),
        seed=run.seed,
    )


def unused_training_settings(section) -> set[str]:
    """Settings its optimizer does not read (AdamW takes no `momentum`): kept out of cache keys."""
    return set() if section.optimizer == "sgd" else {"momentum"}


def make_optimizer(groups: list[tuple[list, float]], settings: TrainSettings) -> torch.optim.Optimizer:
    """groups: (parameters, LR multiplier). The multiplier is kept for the poly schedule."""
    param_groups = [
        {"params": [p for p in params if p.requires_grad], "lr": settings.lr * mult, "lr_mult": mult}
        for params, mult in groups
    ]
    param_groups = [g for g in param_groups if g["params"]]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(param_groups, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def set_poly_lr(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int, power: float) -> float:
    factor = (1 - step / max(1, total)) ** power
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group["lr_mult"] * factor
    return base_lr * factor


class EpochSampler(Sampler):
    """Yields (epoch, index) for every batch of epochs `first`..`epochs - 1`, in one stream.

    The loader's persistent workers keep their own copy of the dataset, so the epoch travels
    with every index instead of through `dataset.set_epoch`; and because one iterator spans
    all the epochs, the workers prefetch the next epoch's first batches while the current one
    ends (a fresh iterator per epoch would leave the GPU waiting for a whole batch each epoch).
    Each epoch is a permutation drawn from a generator seeded by (seed, epoch), cut to
    `per_epoch` indices (whole batches): a resumed run sees the same batches. Under torchrun
    DistributedSampler (seeded by seed + epoch) gives each process its share first."""

    def __init__(self, dataset: Dataset, seed: int, first: int, epochs: int, per_epoch: int):
        self.size, self.seed, self.first, self.epochs, self.per_epoch = len(dataset), seed, first, epochs, per_epoch
        self.shard = None
        if distributed.active():
            self.shard = DistributedSampler(
                dataset,
                num_replicas=distributed.world_size(),
                rank=distributed.rank(),
                shuffle=True,
                seed=seed,
                drop_last=True,
            )

    def __len__(self) -> int:
        return (self.epochs - self.first) * self.per_epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shard is not None:
            self.shard.set_epoch(epoch)
            indices = list(self.shard)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            indices = torch.randperm(self.size, generator=generator).tolist()
        return indices[: self.per_epoch]

    def __iter__(self):
        for epoch in range(self.first, self.epochs):
            yield from ((epoch, index) for index in self.epoch_indices(epoch))


class EpochItems(Dataset):
    """`EpochItems(dataset)[(epoch, index)]`: the item as augmented in `epoch`, through the
    dataset's `item(index, epoch)`. It never calls `set_epoch` (which may fire main-process
    hooks); a dataset without `item` must not depend on the epoch."""

    def __init__(self, dataset: Dataset):
        if hasattr(dataset, "set_epoch") and not hasattr(dataset, "item"):
            raise TypeError(
                f"{type(dataset).__name__} has set_epoch but no item(index, epoch): "
                f"loader workers could not see the epoch"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        if hasattr(self.dataset, "item"):
            return self.dataset.item(index, epoch)
        return self.dataset[index]


PREFETCH_FACTOR = 4  # batches each loader worker keeps ready


def make_loader(dataset: Dataset, settings: TrainSettings, device: torch.device, first_epoch: int = 0) -> DataLoader:
    """One loader for epochs `first_epoch`.. of a fit, its workers kept throughout: iterate it
    once and take `steps_per_epoch(...)` batches per epoch. Under torchrun each process loads
    its own share of every epoch, `per_process_batch` at a time."""
    workers = settings.workers
    batch = per_process_batch(settings.batch_size)
    per_epoch = steps_per_epoch(dataset, settings) * batch
    return DataLoader(
        EpochItems(dataset),
        batch_size=batch,
        sampler=EpochSampler(dataset, settings.seed, first_epoch, settings.epochs, per_epoch),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(settings.seed),  # worker seeds; global RNG untouched
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
        worker_init_fn=loader_worker_init() if workers else None,
    )


def steps_per_epoch(dataset: Dataset, settings: TrainSettings) -> int:
    """Whole batches per epoch and process (the remainder of each epoch's permutation is dropped)."""
    return len(dataset) // distributed.world_size() // per_process_batch(settings.batch_size)


def per_process_batch(batch_size: int) -> int:
    """The configured batch is the global one: under torchrun each process takes an equal part,
    so the optimisation (and the cache key) does not depend on the number of processes."""
    world = distributed.world_size()
    if batch_size % world:
        raise WssError(
            f"batch_size {batch_size} does not split evenly over {world} processes; choose a multiple of {world}"
        )
    return batch_size // world


def to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def loader_batches(loader: DataLoader):
    """Iterate a loader; a user error raised in a worker process comes back as its own one-line
    message instead of DataLoader's re-raise, which embeds the worker's whole traceback."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except WssError as error:
            raise type(error)(worker_message(str(error))) from None
        yield batch


def worker_message(text: str) -> str:
    """The original message from DataLoader's wrapped one, whose last line is `module.Error: message`."""
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and "Error" in name and " " not in name else last


def rewrite_epoch_log(path: Path, desc: str, history: list[dict]) -> None:
    """metrics.jsonl's `desc` epochs as the checkpoint has them: a run stopped between the
    checkpoint and the log line neither loses nor repeats an epoch."""

    def other_step(line: str) -> bool:  # a line cut short by the kill is dropped too
        try:
            return json.loads(line).get("stage_step") != desc
        except ValueError:
            return False

    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and other_step(line)]
    kept += [json_text({"stage_step": desc, **record}) for record in history]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def reuse_trained(model: torch.nn.Module, twin: Path, model_file: str, out: Path, stage: str) -> list[dict]:
    """Load into `model` the weights that `twin`, an artifact of `stage` trained with the same
    settings (its key differs in inference settings only), saved in `model_file`, and copy its
    epoch log. Returns the log as fit's history: training is skipped."""
    log.info(
        "%s: reusing the model trained in %s (same training settings, other inference settings): no training",
        stage,
        twin,
    )
    path = twin / model_file
    load_weights(model, read_model_file(path, stage, "model", stage).tensors, path, f"{stage} model", stage)
    epoch_log = twin / "metrics.jsonl"
    lines = [line for line in epoch_log.read_text().splitlines() if line.strip()] if epoch_log.is_file() else []
    if distributed.is_main() and lines:
        write_text_atomic(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    return [json.loads(line) for line in lines]


def read_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, desc: str
) -> Checkpoint | None:
    """The checkpoint `--resume` continues from, checked to fit `model` and `optimizer`, or None:
    there is none, or it is unusable (a kill while the disk was full, a file of another run),
    which costs the epochs trained so far but not the run."""
    if not path.is_file():
        return None
    try:
        return read_checkpoint_file(path, model, optimizer)
    except StageInputError as error:
        log.warning("%s: %s; training from the start", desc, error)
        return None


def fit(
    model: torch.nn.Module,
    dataset: Dataset,
    groups: list[tuple[list, float]],
    step: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    settings: TrainSettings,
    device: torch.device,
    out: Path,
    resume: bool = False,
    desc: str = "train",
) -> list[dict]:
    """Train for settings.epochs, checkpointing into out/CHECKPOINT after every epoch.

    `step` gets the model to call (wrapped in DistributedDataParallel under torchrun, so call
    it for the forward pass and reach other methods through the unwrapped model)."""
    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(groups, settings)
    world = distributed.world_size()
    steps = steps_per_epoch(dataset, settings)
    if steps == 0:
        raise WssError(
            f"{desc}: {len(dataset)} training images is fewer than one batch "
            f"(batch_size {settings.batch_size}); lower the batch size"
        )
    total_steps = steps * settings.epochs
    start_epoch, history = 0, []
    checkpoint_path = out / CHECKPOINT
    state = read_checkpoint(checkpoint_path, model, optimizer, desc) if resume else None
    if state is not None:
        model.load_state_dict(state.weights)
        optimizer.load_state_dict(state.optimizer)
        start_epoch, history = state.epoch + 1, state.history
        log.info("%s: resumed after epoch %d of %d", desc, start_epoch, settings.epochs)
        if distributed.is_main():
            rewrite_epoch_log(out / "metrics.jsonl", desc, history)
    elif resume and distributed.is_main():  # no usable checkpoint (none yet, an unreadable one, or the
        rewrite_epoch_log(out / "metrics.jsonl", desc, [])  # stage finished and was killed before its commit)
    recorder = run_log.current() if distributed.is_main() else run_log.RunLog()
    recording = type(recorder) is not run_log.RunLog  # without a recorder the loop reads no more values
    if resume:
        recorder.resumed(start_epoch * steps, steps, history)
    net = model
    if distributed.active():  # DDP starts every rank from rank 0's weights, resumed or not
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics_log = out / "metrics.jsonl"
    batches = loader_batches(make_loader(dataset, settings, device, first_epoch=start_epoch))
    for epoch in range(start_epoch, settings.epochs):
        if hasattr(dataset, "set_epoch"):  # main process only (hooks such as seg's held-out scoring);
            dataset.set_epoch(epoch)  # the workers get the epoch with each index
        model.train()
        # the model's own randomness (DropBlock) is seeded per (epoch, process): a resumed run
        # continues exactly as the uninterrupted one, and processes drop different blocks
        torch.manual_seed(settings.seed * 1000 + epoch + 100_003 * distributed.rank())
        # running sums stay on the device: reading them (a GPU sync) only every `log_every` steps
        # lets the host queue the next step while the GPU still works on this one
        sums: dict[str, torch.Tensor | float] = {}
        reported, reported_at = {}, 0  # the sums at the last report to the recorder
        started, seen = time.time(), 0
        bar = tqdm(
            itertools.islice(batches, steps),
            total=steps,
            unit="batch",
            leave=False,
            desc=f"{desc} epoch {epoch + 1}/{settings.epochs}",
        )
        for i, batch in enumerate(bar):
            lr = set_poly_lr(optimizer, settings.lr, epoch * steps + i, total_steps, settings.poly_power)
            batch = to_device(batch, device, channels_last)
            with autocast(device):
                loss, logs = step(net, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(next(iter(batch.values()))) * world
            for key, value in {"loss": loss.detach().float(), **logs}.items():
                sums[key] = sums.get(key, 0.0) + (value.detach().float() if torch.is_tensor(value) else value)
            if (i + 1) % settings.log_every == 0 or i + 1 == steps:
                mean_loss = float(sums["loss"]) / (i + 1)
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"{desc}: loss became {mean_loss} in epoch {epoch + 1} "
                        f"(by step {i + 1}); lower the learning rate"
                    )
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2g}")
                if recording:  # the GPU has synchronised for the loss: the other sums cost no wait
                    totals = {key: float(value) for key, value in sums.items()}
                    window = i + 1 - reported_at
                    means = {key: (total - reported.get(key, 0.0)) / window for key, total in totals.items()}
                    recorder.step(epoch * steps + i + 1, means, lr)
                    reported, reported_at = totals, i + 1
        seconds = time.time() - started
        sums = distributed.mean_over_ranks(sums, device)  # the epoch's loss over all images
        record = {
            "epoch": epoch + 1,
            **{k: float(v) / steps for k, v in sums.items()},
            "images_per_s": seen / max(seconds, 1e-9),
            "seconds": seconds,
        }
        history.append(record)
        if distributed.is_main():  # checkpoint first: a resumed run never logs an epoch twice
            # (the recorder before it: a resumed run drops the recorder's points past its checkpoint)
            recorder.epoch((epoch + 1) * steps, record)
            write_checkpoint(checkpoint_path, model, optimizer, epoch, history)
            mark_elapsed(out)  # a resumed stage's time counts the epochs trained before a kill
            with open(metrics_log, "a") as handle:
                handle.write(json_text({"stage_step": desc, **record}) + "\n")
            log.info(
                "%s epoch %d/%d: loss %.4f, %.1f img/s",
                desc,
                epoch + 1,
                settings.epochs,
                record["loss"],
                record["images_per_s"],
            )
    distributed.sync_module(model)  # under torchrun BatchNorm statistics differ per rank: keep rank 0's
    model.eval()
    return history


def finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else float("nan")
