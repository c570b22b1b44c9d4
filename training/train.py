"""Train a small SAM on synthetic shapes, resumably, across sessions.

A run is defined by its ``TrainConfig`` and its length in steps (``total_steps``): the
learning rate schedule, the data each step reads and every random draw are functions of
the step number alone, so a run may stop at any step (``minutes``: this session's share)
and continue later from its checkpoint (``resume``) with nothing changed. Every
``checkpoint_minutes`` and at the end of a session it writes, atomically:

* ``build/runs/<run>/checkpoint.pth``: the exact (full) checkpoint, for this machine;
* ``training/runs/<run>/checkpoint.pth``: the compact one, a few MB, for git;
* ``training/runs/<run>/log.txt``: the run's log, appended to by every session;
* ``training/runs/<run>/model.pth`` and ``model.json``: the float16 weights and a summary,
  when the run reaches ``total_steps``.

Images come from a dataset rendered once (``training.shards``, rendered on first use) and
are varied by ``training.augment``; a step is ``training.step``'s.

    nice -n 19 python scripts/train.py --run NAME --total-steps 20000 --minutes 60
    nice -n 19 python scripts/train.py --resume build/runs/NAME/checkpoint.pth --minutes 60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from samserve.models import SamSpec, assemble_sam, spec_by_name

from . import checkpoints
from .augment import AugmentConfig, Batch, batch_for_step, step_indices
from .shards import DATA_ROOT, SCENES_BY_VERSION, RenderConfig, ShardDataset, render
from .step import Decode, StepConfig, batch_loss, decode_masks
from .stopwatch import OFF, Stopwatch
from .synthetic import TRAIN_SEED

Log = Callable[[str], None]

SESSION_FIELDS = (
    "minutes",
    "session_steps",
    "checkpoint_minutes",
    "threads",
    "device",
    "compile",
    "log_every",
    "resume",
    "extend_to",
    "data_root",
    "committed_root",
    "local_root",
)
"""Settings a resumed run may change: how this session runs, not what the run computes.
A resumed run keeps its ``total_steps`` unless ``extend_to`` names a new one (which then
stretches the schedule from that step on): a default on the command line must never
shorten a run."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (saved in its checkpoints).

    Model: ``spec`` by name, with the data's image size and ``stem_channels`` (non-empty)
    replacing the spec's; ``init``, a state dict or training checkpoint to start from
    (resized to this input size); ``freeze_encoder`` trains the prompt encoder and mask
    decoder only.
    Data: ``data`` (the rendered dataset; its image size is the model's), ``augment``,
    ``images_per_step``. Step: ``step`` (prompts and losses). Schedule: AdamW with ``lr``
    warmed up linearly over ``warmup_steps``, then cosine to ``min_lr`` at ``total_steps``.
    Speed: ``threads``; ``autocast`` "none", "encoder" (bf16 image encoder) or "all";
    ``compile`` the encoder and decoder with ``torch.compile``. Session: ``minutes`` of
    training before checkpointing and stopping (0: until ``total_steps``), or
    ``session_steps`` steps (0: no limit), ``checkpoint_minutes`` between checkpoints,
    ``run`` names the run's folders under ``committed_root`` and ``local_root``;
    ``extend_to``, when resuming, the run's new ``total_steps`` (0: keep the saved one).
    """

    run: str = "default"
    spec: str = "sam_small"
    stem_channels: tuple[int, ...] = ()
    init: str = ""
    freeze_encoder: bool = False
    data: RenderConfig = field(default_factory=RenderConfig)
    data_root: str = str(DATA_ROOT)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    images_per_step: int = 4
    step: StepConfig = field(default_factory=StepConfig)
    total_steps: int = 20_000
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.05
    seed: int = TRAIN_SEED
    threads: int = 2
    device: str = ""
    autocast: str = "encoder"
    compile: bool = False
    minutes: float = 0.0
    session_steps: int = 0
    checkpoint_minutes: float = 5.0
    log_every: int = 50
    resume: str = ""
    extend_to: int = 0
    committed_root: str = "training/runs"
    local_root: str = "build/runs"

    def model_spec(self) -> SamSpec:
        """The architecture trained: ``spec`` with this run's input size and stem."""
        spec = spec_by_name(self.spec)
        changes: dict[str, Any] = {"image_size": self.data.image_size}
        if self.stem_channels:
            changes["stem_channels"] = tuple(self.stem_channels)
        return dataclasses.replace(spec, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings; ``from_dict`` reads them back."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config ``to_dict`` wrote (nested configs and tuples restored)."""
        return _from_dict(cls, data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A (possibly nested) frozen dataclass of type ``cls`` from its ``asdict`` JSON."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            value = _from_dict(type(default), value)
        elif isinstance(default, tuple):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


@dataclass
class Prepared:
    """A model ready to train: the model on its device, what is trained and how."""

    sam: Sam
    spec: SamSpec
    device: torch.device
    trained: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Decode
    encoder_autocast: bool
    decoder_autocast: bool


def prepare(config: TrainConfig) -> Prepared:
    """Threads, seed, model (from ``init`` if given), optimizer and the fast paths.

    Arguments:
      config (TrainConfig): the run's settings.
    Returns:
      (Prepared): the model in training mode on its device, with its AdamW optimizer.
    """
    torch.set_num_threads(config.threads or torch.get_num_threads())
    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = config.model_spec()
    sam = assemble_sam(spec)
    if config.init:
        _, state = checkpoints.model_state(Path(config.init))
        sam.load_state_dict(resized_state(state, sam))
    sam.to(device).train()
    # A frozen encoder builds no autograd graph: its forward is all a step pays for it.
    sam.image_encoder.requires_grad_(not config.freeze_encoder)
    trained = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    encode: Callable[[torch.Tensor], torch.Tensor] = sam.image_encoder
    decode: Decode = decode_masks
    if config.compile:
        encode = torch.compile(sam.image_encoder, dynamic=False)
        decode = torch.compile(decode_masks, dynamic=False)
    if config.autocast not in ("none", "encoder", "all"):
        raise ValueError(f"autocast must be none, encoder or all, not {config.autocast!r}")
    return Prepared(
        sam,
        spec,
        device,
        trained,
        optimizer,
        encode,
        decode,
        config.autocast != "none",
        config.autocast == "all",
    )


def resized_state(state: dict[str, torch.Tensor], sam: Sam) -> dict[str, torch.Tensor]:
    """``state`` (any float type) fitted to ``sam``, whose encoder may take another input size.

    Only the encoder's position terms depend on its input size: the absolute position
    embedding (1xHxWxC, bicubic) and the relative position tables of the global-attention
    blocks ((2H-1)xC, linear) are resized to ``sam``'s token grid; every other weight is
    size-free and kept (docs/model_card.md, stage 3).

    Arguments:
      state (dict): a state dict of the same architecture at another input size.
      sam (Sam): the model it is for.
    Returns:
      (dict): float32 weights that ``sam.load_state_dict`` accepts.
    """
    target = sam.state_dict()
    fitted = {}
    for key, value in state.items():
        value = value.float() if value.is_floating_point() else value
        shape = target[key].shape
        if value.shape != shape and key.endswith("pos_embed"):
            value = F.interpolate(value.permute(0, 3, 1, 2), size=shape[1:3], mode="bicubic")
            value = value.permute(0, 2, 3, 1)
        elif value.shape != shape and "rel_pos" in key:
            value = F.interpolate(value.T[None], size=shape[0], mode="linear")[0].T
        fitted[key] = value
    return fitted


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at
    ``total_steps``: a function of the step alone, so resuming keeps the schedule."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of every random draw of step ``step`` (augmentation, prompts, clicks)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def train_step(
    run: Prepared,
    batch_inputs: Batch,
    g: torch.Generator,
    config: TrainConfig,
    watch: Stopwatch = OFF,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """One optimizer step on one step's batch; returns the loss and its parts.

    The decoder's backward pass stops at a copy of the embeddings and the encoder's runs
    from there: the same gradients as one pass, timed apart.

    Arguments:
      run (Prepared): model, optimizer and fast paths.
      batch_inputs (Batch): the step's images and labels.
      g (torch.Generator): the step's generator.
      config (TrainConfig): the run's settings.
      watch (Stopwatch): times the phases.
    Returns:
      (tuple): the loss and, per prompt kind and ``refine``, each image's IoU.
    """
    sam, optimizer = run.sam, run.optimizer
    inputs = batch_inputs.inputs.to(run.device)
    device_type = run.device.type
    with watch.phase("encoder_forward"):
        with torch.autocast(device_type, torch.bfloat16, enabled=run.encoder_autocast):
            embeddings = run.encode(inputs)
        embeddings = embeddings.float()
    detached = embeddings.detach().requires_grad_(embeddings.requires_grad)
    with torch.autocast(device_type, torch.bfloat16, enabled=run.decoder_autocast):
        loss, parts = batch_loss(sam, run.decode, detached, batch_inputs, config.step, g, watch)
    with watch.phase("decoder_backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    if detached.grad is not None:
        with watch.phase("encoder_backward"):
            embeddings.backward(detached.grad)
    with watch.phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(run.trained, 1.0)
        optimizer.step()
    return loss, parts


def run_folders(config: TrainConfig) -> tuple[Path, Path]:
    """(the run's committed folder, by default ``training/runs/<run>``, and its
    machine-local one, ``build/runs/<run>``), relative to the working directory."""
    return Path(config.committed_root) / config.run, Path(config.local_root) / config.run


def _session_config(config: TrainConfig) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The config to run and the checkpoint to resume from: a resumed run keeps its saved
    config but for ``SESSION_FIELDS``, which this session's ``config`` sets."""
    if not config.resume:
        return config, None
    checkpoint = checkpoints.load(Path(config.resume))
    saved = TrainConfig.from_dict(checkpoint["config"])
    session = {name: getattr(config, name) for name in SESSION_FIELDS}
    if config.extend_to:
        session["total_steps"] = config.extend_to
    return dataclasses.replace(saved, **session), checkpoint


def train(config: TrainConfig, log: Log = print) -> Sam:
    """Train (or continue) a run for this session; see the module docstring.

    Arguments:
      config (TrainConfig): the run's settings (with ``resume``: this session's only).
      log (Log): where progress lines go (they are also appended to the run's log.txt).
    Returns:
      (Sam): the model as trained so far, in eval mode.
    """
    config, checkpoint = _session_config(config)
    committed, local = run_folders(config)
    committed.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        log(message)
        with open(committed / "log.txt", "a") as handle:
            handle.write(message + "\n")

    run = prepare(config)
    step, trained_seconds, history = 0, 0.0, []
    if checkpoint is not None:
        checkpoints.restore(checkpoint, run.sam, run.optimizer)
        step, trained_seconds = checkpoint["step"], checkpoint["trained_seconds"]
        history = checkpoint.get("history", [])
        say(f"resumed {config.resume} ({checkpoint['format']}) at step {step}")
    dataset = ShardDataset(render(config.data, Path(config.data_root)))
    params = sum(p.numel() for p in run.sam.parameters())
    say(
        f"session of run {config.run} on {run.device}: {params / 1e6:.2f} M parameters, "
        f"steps {step}..{config.total_steps}, config {json.dumps(config.to_dict())}"
    )
    mean, std = run.sam.pixel_mean.cpu(), run.sam.pixel_std.cpu()

    def save(reason: str) -> None:
        record = {
            "step": step,
            "trained_seconds": trained_seconds,
            "config": config.to_dict(),
            "spec": run.spec.to_dict(),
            "history": history[-200:],
        }
        full = checkpoints.full_checkpoint(run.sam, run.optimizer, record)
        checkpoints.atomic_save(full, local / "checkpoint.pth")
        checkpoints.atomic_save(checkpoints.compact_checkpoint(full), committed / "checkpoint.pth")
        say(f"checkpoint at step {step} ({reason}), {trained_seconds / 3600:.2f} h trained")

    started = last_save = time.monotonic()
    stop = config.total_steps
    if config.session_steps:
        stop = min(stop, step + config.session_steps)
    while step < stop:
        now = time.monotonic()
        if config.minutes and now - started >= 60 * config.minutes:
            break
        if now - last_save >= 60 * config.checkpoint_minutes:
            save("periodic")
            last_save = now
        begun = time.monotonic()
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        g = step_generator(config.seed, step)
        indices = step_indices(step, len(dataset), config.images_per_step, config.seed)
        batch = batch_for_step(dataset, indices, mean, std, config.augment, g)
        loss, parts = train_step(run, batch, g, config)
        history.append(
            {"step": step, "loss": loss.item(), **{k: float(np.mean(v)) for k, v in parts.items()}}
        )
        step += 1
        trained_seconds += time.monotonic() - begun
        if step % config.log_every == 0 or step == config.total_steps:
            say(_progress(step, trained_seconds, learning_rate(step - 1, config), history))
    save("end of session" if step < config.total_steps else "finished")
    if step >= config.total_steps:
        _write_model(run, config, committed, step, trained_seconds, history, params)
    run.sam.eval()
    return run.sam


def _write_model(
    run: Prepared,
    config: TrainConfig,
    folder: Path,
    step: int,
    trained_seconds: float,
    history: list[dict[str, float]],
    params: int,
) -> None:
    """The finished run's float16 weights (``model.pth``) and summary (``model.json``)."""
    state = {
        k: v.detach().cpu().half() if v.is_floating_point() else v.cpu()
        for k, v in run.sam.state_dict().items()
    }
    checkpoints.atomic_save(state, folder / "model.pth")
    summary = {
        "spec": run.spec.to_dict(),
        "config": config.to_dict(),
        "steps": step,
        "trained_hours": trained_seconds / 3600,
        "parameters": params,
        "final": history[-1] if history else {},
    }
    (folder / "model.json").write_text(json.dumps(summary, indent=2) + "\n")


def _progress(step: int, seconds: float, lr: float, history: list[dict[str, float]]) -> str:
    """One log line: step, hours trained, learning rate, recent mean loss and IoUs."""
    recent = history[-50:]
    keys = ("loss", "point", "box", "point_box", "refine")
    means = {k: np.mean([h[k] for h in recent if k in h] or [0.0]) for k in keys}
    return (
        f"step {step:6d}  {seconds / 3600:6.3f} h  {step / max(seconds, 1e-9):5.2f} steps/s  "
        f"lr {lr:.2e}  loss {means['loss']:.3f}  train IoU point {means['point']:.3f}  "
        f"box {means['box']:.3f}  point+box {means['point_box']:.3f}  "
        f"refine {means['refine']:.3f}"
    )


PREFIXES = {"data": "data-", "augment": "augment-", "step": ""}
"""Flag prefixes of the nested configs' fields (``--data-count``, ``--prompts-per-image``);
``--image-size`` sets the data's (and so the model's) input size."""


def _flags() -> dict[str, tuple[str, ...]]:
    """Every command-line flag and the config path it sets (field names, outer first)."""
    flags: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in PREFIXES:
            for inner in dataclasses.fields(f.default_factory()):
                if inner.name == "scenes":
                    continue
                name = "image-size" if inner.name == "image_size" else PREFIXES[f.name] + inner.name
                flags[name.replace("_", "-")] = (f.name, inner.name)
        else:
            flags[f.name.replace("_", "-")] = (f.name,)
    return flags


def _default(path: tuple[str, ...]) -> Any:
    """The default value at ``path`` in TrainConfig."""
    value: Any = TrainConfig()
    for name in path:
        value = getattr(value, name)
    return value


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """The TrainConfig the command line describes (flags in ``_flags``, underscores as
    hyphens; booleans as true/false; tuples as several values)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags = _flags()
    for flag, path in flags.items():
        default = _default(path)
        if isinstance(default, bool):
            parser.add_argument(f"--{flag}", type=lambda s: s == "true", default=default)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else int
            parser.add_argument(f"--{flag}", type=kind, nargs="*", default=list(default))
        else:
            parser.add_argument(f"--{flag}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    nested: dict[str, dict[str, Any]] = {name: {} for name in PREFIXES}
    top: dict[str, Any] = {}
    for flag, path in flags.items():
        value = args[flag.replace("-", "_")]
        value = tuple(value) if isinstance(value, list) else value
        if len(path) == 2:
            nested[path[0]][path[1]] = value
        else:
            top[path[0]] = value
    for name, values in nested.items():
        top[name] = dataclasses.replace(_default((name,)), **values)
    top["data"] = dataclasses.replace(top["data"], scenes=SCENES_BY_VERSION[top["data"].version])
    return TrainConfig(**top)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    train(config_from_args(argv), log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
