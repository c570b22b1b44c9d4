"""Resumable training checkpoints: exact ones for the machine, compact ones for git.

A *full* checkpoint holds everything the next step depends on: the model's and the
optimizer's float32 state, the step (which fixes the learning rate, the data position and
each step's random draws, see ``training.train``), the run's configuration, the random
number generators' states, the training time so far and the recent log. Resuming from it
continues bit for bit as if the run had never stopped.

A *compact* checkpoint is what a session commits (a few MB): the weights in float16, the
optimizer's second moments quantised to one byte each on a log scale, and no first moments
(they refill within a few tens of steps, at beta1 = 0.9). Resuming from it is a warm
restart: the same schedule, data and draws, slightly different arithmetic.

Both are written atomically (a temporary file renamed over the old one), so a run killed
mid-write leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

FULL = "full"
COMPACT = "compact"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``.

    Arguments:
      obj (Any): what to save.
      path (Path): the checkpoint's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def full_checkpoint(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, record: dict[str, Any]
) -> dict[str, Any]:
    """A full checkpoint: ``record`` (step, config, times, log) plus model, optimizer and RNG.

    Arguments:
      model (torch.nn.Module): the model being trained.
      optimizer (torch.optim.Optimizer): its optimizer.
      record (dict): JSON-like facts about the run (``step`` at least).
    Returns:
      (dict): ready for ``atomic_save``.
    """
    return {
        **record,
        "format": FULL,
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def _encode_log(values: torch.Tensor) -> dict[str, Any]:
    """Non-negative float ``values`` as uint8 codes of log2 spread over the tensor's range
    (0 for exact zeros), and the range; ``_decode_log`` inverts it to within a few percent."""
    positive = values > 0
    logs = torch.log2(values[positive].float()) if positive.any() else torch.zeros(1)
    low, high = float(logs.min()), float(logs.max())
    span = max(high - low, 1e-12)
    codes = torch.zeros(values.shape, dtype=torch.uint8)
    codes[positive] = (1 + torch.round((logs - low) / span * 254)).to(torch.uint8)
    return {"codes": codes, "low": low, "high": high}


def _decode_log(encoded: dict[str, Any]) -> torch.Tensor:
    """The float32 tensor ``_encode_log`` encoded."""
    codes = encoded["codes"]
    span = encoded["high"] - encoded["low"]
    values = torch.exp2(encoded["low"] + (codes.float() - 1) / 254 * span)
    return torch.where(codes > 0, values, torch.zeros_like(values))


def compact_checkpoint(full: dict[str, Any]) -> dict[str, Any]:
    """The compact form of a full checkpoint (see the module docstring).

    Arguments:
      full (dict): a ``full_checkpoint``.
    Returns:
      (dict): the record, float16 weights and log-quantised second moments.
    """
    record = {k: v for k, v in full.items() if k not in ("model", "optimizer", "format")}
    optimizer = full["optimizer"]
    second = {
        index: _encode_log(state["exp_avg_sq"])
        for index, state in optimizer["state"].items()
        if "exp_avg_sq" in state
    }
    return {
        **record,
        "format": COMPACT,
        "model": {k: v.half() if v.is_floating_point() else v for k, v in full["model"].items()},
        "param_groups": optimizer["param_groups"],
        "exp_avg_sq": second,
        "optimizer_step": {
            index: state["step"] for index, state in optimizer["state"].items() if "step" in state
        },
    }


def restore(
    checkpoint: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load a full or compact checkpoint into ``model`` and ``optimizer``, in place.

    Arguments:
      checkpoint (dict): as ``load`` returns it.
      model (torch.nn.Module): a model of the checkpoint's architecture.
      optimizer (torch.optim.Optimizer): its optimizer over the same parameters.
    """
    state = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    if checkpoint["format"] == FULL:
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = {}
    for index, encoded in checkpoint["exp_avg_sq"].items():
        second = _decode_log(encoded)
        states[index] = {
            "step": checkpoint["optimizer_step"][index].clone(),
            "exp_avg": torch.zeros_like(params[index]),
            "exp_avg_sq": second.to(params[index].device),
        }
    optimizer.load_state_dict({"state": states, "param_groups": checkpoint["param_groups"]})
    torch.set_rng_state(checkpoint["torch_rng"])


def load(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``atomic_save`` (full or compact), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def model_state(path: Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """The weights in ``path`` and, for a training checkpoint, its model's spec.

    Arguments:
      path (Path): a plain state dict (``models/*.pth``) or a full or compact checkpoint.
    Returns:
      (tuple): (the spec as ``SamSpec.to_dict`` wrote it, or None for a plain state dict;
        float32 weights).
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    spec = None
    if isinstance(data, dict) and data.get("format") in (FULL, COMPACT):
        spec, data = data["spec"], data["model"]
    return spec, {k: v.float() if v.is_floating_point() else v for k, v in data.items()}
