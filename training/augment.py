"""A training step's images: read from a rendered dataset, varied, normalised and padded.

Each image of the dataset is reused across epochs, each time seen differently: one of the
eight flips and quarter turns, sometimes zoomed in (a crop scaled up to the full frame) or
out (scaled down, more padding), and with its colours jittered (brightness, contrast,
per-channel gain, swapped channels, grey, inverted). Labels follow every geometric change
by nearest-neighbour resampling. All randomness comes from one ``torch.Generator``, so a
step's batch is a function of the seed and the step alone (``batch_for_step``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .shards import ShardDataset


@dataclass(frozen=True)
class AugmentConfig:
    """How much images vary; ``enabled=False`` passes them through unchanged.

    p_zoom: probability of a zoom, by a factor log-uniform in zoom_range (below 1: smaller).
    p_colour: probability of a colour jitter; brightness: the largest added offset (pixel
    values); contrast: the factor range about the image's mean; gain: the largest relative
    change of one channel; p_shuffle, p_grey, p_invert: probabilities of a channel
    permutation, a grey image and an inverted one.
    """

    enabled: bool = True
    p_zoom: float = 0.5
    zoom_range: tuple[float, float] = (0.5, 2.0)
    p_colour: float = 0.8
    brightness: float = 30.0
    contrast: tuple[float, float] = (0.6, 1.4)
    gain: float = 0.15
    p_shuffle: float = 0.25
    p_grey: float = 0.1
    p_invert: float = 0.05


@dataclass
class Batch:
    """One step's images in the model's input frame.

    inputs: Bx3xSxS float32, normalised by the model's pixel mean and std, zero-padded (as
    ``Sam.preprocess``). labels: BxSxS uint8 instance labels (0: background and padding).
    sizes: the (h, w) of each image's unpadded region.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    sizes: list[tuple[int, int]]


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    """One float uniform in [low, high) from ``generator``."""
    return low + (high - low) * float(torch.rand((), generator=generator))


def _geometry(
    image: torch.Tensor, labels: torch.Tensor, size: int, config: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random flip or quarter turn and zoom of an image whose long side is ``size``.

    Arguments:
      image (torch.Tensor): 3xhxw float32, pixel values 0-255.
      labels (torch.Tensor): hxw uint8.
    Returns:
      (tuple): 3xh'xw' image and h'xw' labels, long side at most ``size``.
    """
    turns = int(torch.randint(4, (), generator=g))
    image, labels = torch.rot90(image, turns, (1, 2)), torch.rot90(labels, turns, (0, 1))
    if _uniform(g) < 0.5:
        image, labels = image.flip(2), labels.flip(1)
    if _uniform(g) >= config.p_zoom:
        return image, labels
    low, high = (math.log(v) for v in config.zoom_range)
    zoom = math.exp(_uniform(g, low, high))
    h, w = labels.shape
    if zoom > 1:  # a crop 1/zoom of each side, scaled back up to the full frame
        ch, cw = max(8, round(h / zoom)), max(8, round(w / zoom))
        top, left = int(_uniform(g) * (h - ch + 1)), int(_uniform(g) * (w - cw + 1))
        image, labels = (
            image[:, top : top + ch, left : left + cw],
            labels[top : top + ch, left : left + cw],
        )
        scale = size / max(ch, cw)
    else:
        scale = zoom
    h, w = labels.shape
    out = (max(8, min(size, round(h * scale))), max(8, min(size, round(w * scale))))
    image = F.interpolate(
        image[None], out, mode="bilinear", antialias=scale < 1, align_corners=False
    )[0]
    labels = F.interpolate(labels[None, None].float(), out, mode="nearest-exact")[0, 0]
    return image, labels.to(torch.uint8)


def _colour(image: torch.Tensor, config: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """``image`` (3xhxw float32, 0-255) with jittered colours, clamped to 0-255."""
    if _uniform(g) >= config.p_colour:
        return image
    mean = image.mean(dim=(1, 2), keepdim=True)
    contrast = _uniform(g, *config.contrast)
    gains = 1 + config.gain * (2 * torch.rand(3, 1, 1, generator=g) - 1)
    offset = config.brightness * (2 * _uniform(g) - 1)
    image = ((image - mean) * contrast + mean) * gains + offset
    if _uniform(g) < config.p_shuffle:
        image = image[torch.randperm(3, generator=g)]
    if _uniform(g) < config.p_grey:
        image = image.mean(dim=0, keepdim=True).expand(3, -1, -1)
    if _uniform(g) < config.p_invert:
        image = 255 - image
    return image.clamp(0, 255)


def augment(
    image: np.ndarray, labels: np.ndarray, size: int, config: AugmentConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stored image, varied.

    Arguments:
      image (np.ndarray): hxwx3 uint8, long side ``size`` (a ``ShardDataset`` item).
      labels (np.ndarray): hxw uint8 instance labels.
      size (int): the model's input side.
      config (AugmentConfig): how much to vary it.
      g (torch.Generator): the step's generator.
    Returns:
      (tuple): 3xh'xw' float32 image (0-255) and h'xw' uint8 labels, long side <= ``size``.
    """
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()
    label_map = torch.from_numpy(labels)
    if not config.enabled:
        return pixels, label_map
    pixels, label_map = _geometry(pixels, label_map, size, config, g)
    return _colour(pixels, config, g), label_map


def step_indices(step: int, count: int, per_step: int, seed: int) -> list[int]:
    """The dataset positions a step reads: consecutive places of a stream that visits the
    dataset in a fresh random order each epoch (``np.random.default_rng([seed, epoch])``).

    Arguments:
      step (int): the optimizer step.
      count (int): the dataset's length.
      per_step (int): images per step.
      seed (int): the run's seed.
    Returns:
      (list[int]): ``per_step`` indices into the dataset.
    """
    out = []
    for place in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(place, count)
        out.append(int(_epoch_order(seed, epoch, count)[offset]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order an epoch visits ``count`` images in (made once, read by every step)."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def batch_for_step(
    dataset: ShardDataset,
    indices: list[int],
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
    config: AugmentConfig,
    g: torch.Generator,
) -> Batch:
    """The step's images, augmented, normalised and padded to the dataset's square frame.

    Arguments:
      dataset (ShardDataset): where the images come from.
      indices (list[int]): which (``step_indices``).
      pixel_mean, pixel_std (torch.Tensor): the model's 3x1x1 normalisation.
      config (AugmentConfig): the augmentation.
      g (torch.Generator): the step's generator.
    Returns:
      (Batch): inputs, labels and unpadded sizes.
    """
    size = dataset.image_size
    inputs = torch.zeros(len(indices), 3, size, size)
    labels = torch.zeros(len(indices), size, size, dtype=torch.uint8)
    sizes = []
    for slot, index in enumerate(indices):
        image, label_map = augment(*dataset.item(index), size, config, g)
        h, w = label_map.shape
        inputs[slot, :, :h, :w] = (image - pixel_mean) / pixel_std
        labels[slot, :h, :w] = label_map
        sizes.append((h, w))
    return Batch(inputs, labels, sizes)
