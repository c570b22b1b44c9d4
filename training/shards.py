"""Training images rendered once into memory-mapped arrays, in the model's input frame.

Drawing a scene costs milliseconds of one core per image; a step reads its images back from
disk instead and varies them by augmentation (``training.augment``). A dataset is a folder:

* ``images.npy``: NxSxSx3 uint8, each image resized so its long side is S
  (``ResizeLongestSide``, as the engine resizes) and zero-padded at the bottom and right;
* ``labels.npy``: NxSxS uint8, 0 for background and padding, k for instance k (1-based);
  instances are the visible regions, so one label map holds them all;
* ``sizes.npy``: Nx2 int16, the (h, w) of each image before padding;
* ``families.npy``: NxMAX_INSTANCES int8, instance k's family as an index into ``FAMILIES``
  (-1 past the last instance);
* ``meta.json``: the ``RenderConfig`` that made it.

Sample i is ``np.random.default_rng([seed, i])``'s: with probability ``classic_share`` one of
``training.synthetic``'s images (the generator of the project's held-out set), else a scene of
``training.shapes`` with the training families. Rendering the same config again gives the
same arrays, so a dataset is rebuilt, not stored, on a new machine:

    nice -n 19 python -m training.shards --image-size 512 --count 8192
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from .shapes import HELDOUT_FAMILIES, TRAIN_FAMILIES, TRAIN_SCENES, SceneConfig, make_scene
from .synthetic import (
    HELDOUT_SEED,
    TEXTURES,
    TRAIN_SEED,
    VALIDATION_SEED,
    Sample,
    make_sample,
    sample_size,
)

FAMILIES = TRAIN_FAMILIES + HELDOUT_FAMILIES
"""Family names by the index ``families.npy`` stores."""
MAX_INSTANCES = 32
"""Most instances one stored image may hold."""
DATA_ROOT = Path("build/data")
"""Where datasets go by default (git-ignored), relative to the repository."""


SCENES_BY_VERSION: dict[int, SceneConfig] = {
    1: SceneConfig(
        families=TRAIN_FAMILIES[: TRAIN_FAMILIES.index("cell") + 1],
        textures=TEXTURES,
        backgrounds=("smooth",),
    ),
    2: TRAIN_SCENES,
}
"""The training catalogue of each dataset version: a new run draws its ``--data-version``'s
(a resumed run keeps the one its config saved)."""


@dataclass(frozen=True)
class RenderConfig:
    """What a rendered dataset holds.

    version: the generators' revision; raise it whenever ``training.shapes`` or
    ``training.synthetic`` draw differently, so that an old rendering is not reused.
    seed: the sample stream (never ``HELDOUT_SEED`` or ``VALIDATION_SEED``). count: images.
    image_size: S, the model's input side. long_side: the drawn image's long side range,
    before resizing to S. classic_share: the share of ``training.synthetic`` images.
    max_objects: most instances of a classic image. scenes: what the other images contain.
    """

    version: int = 2
    seed: int = TRAIN_SEED
    count: int = 8192
    image_size: int = 512
    long_side: tuple[int, int] = (300, 900)
    classic_share: float = 0.3
    max_objects: int = 6
    scenes: SceneConfig = field(default_factory=lambda: TRAIN_SCENES)

    def folder(self, root: Path = DATA_ROOT) -> Path:
        """The dataset's folder under ``root``, named by the settings that size it."""
        return root / f"shapes-v{self.version}-s{self.seed}-n{self.count}-{self.image_size}"

    def to_dict(self) -> dict:
        """JSON-ready settings (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))


def draw_sample(config: RenderConfig, index: int) -> Sample:
    """Sample ``index`` of the stream, at its drawn size (before resizing).

    Arguments:
      config (RenderConfig): the dataset's settings.
      index (int): the sample's position in the stream.
    Returns:
      (Sample): from ``np.random.default_rng([config.seed, index])`` alone.
    """
    if config.seed in (HELDOUT_SEED, VALIDATION_SEED):
        raise ValueError(f"seed {config.seed} is an evaluation set's; training must not use it")
    rng = np.random.default_rng([config.seed, index])
    height, width = sample_size(rng, config.long_side)
    if rng.random() < config.classic_share:
        return make_sample(rng, height, width, config.max_objects)
    return make_scene(rng, height, width, config.scenes)


def to_frame(sample: Sample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample resized into the model's input frame (long side ``size``), unpadded.

    Arguments:
      sample (Sample): HxWx3 image and NxHxW disjoint masks.
      size (int): the model's input side.
    Returns:
      (tuple): hxwx3 uint8 image (``ResizeLongestSide``'s) and hxw uint8 labels: instance k
        (1-based) where its bilinearly resized mask is above one half, else 0.
    """
    image = ResizeLongestSide(size).apply_image(sample.image)
    h, w = image.shape[:2]
    masks = torch.as_tensor(sample.masks, dtype=torch.float32)[None]
    resized = F.interpolate(masks, (h, w), mode="bilinear", align_corners=False)[0]
    best, index = resized.max(dim=0)
    labels = torch.where(best > 0.5, index + 1, 0).to(torch.uint8)
    return image, labels.numpy()


def _render_range(folder: Path, config: RenderConfig, start: int, stop: int) -> None:
    """Render samples ``start``..``stop`` - 1 into the open arrays of ``folder``."""
    torch.set_num_threads(1)
    images = np.load(folder / "images.npy", mmap_mode="r+")
    labels = np.load(folder / "labels.npy", mmap_mode="r+")
    sizes = np.load(folder / "sizes.npy", mmap_mode="r+")
    families = np.load(folder / "families.npy", mmap_mode="r+")
    for index in range(start, stop):
        sample = draw_sample(config, index)
        image, label = to_frame(sample, config.image_size)
        h, w = label.shape
        images[index] = 0
        images[index, :h, :w] = image
        labels[index] = 0
        labels[index, :h, :w] = label
        sizes[index] = (h, w)
        codes = [FAMILIES.index(kind) for kind in sample.kinds][:MAX_INSTANCES]
        families[index] = -1
        families[index, : len(codes)] = codes
    for array in (images, labels, sizes, families):
        array.flush()


def render(config: RenderConfig, root: Path = DATA_ROOT, workers: int = 2) -> Path:
    """Render ``config``'s dataset into its folder under ``root`` (if not there already).

    Arguments:
      config (RenderConfig): what to render.
      root (Path): the datasets' parent folder.
      workers (int): processes that render side by side.
    Returns:
      (Path): the dataset's folder; ``meta.json`` is written last, so a folder without it
        is an interrupted render and is rendered again.
    """
    folder = config.folder(root)
    if (folder / "meta.json").exists():
        found = json.loads((folder / "meta.json").read_text())
        if found != config.to_dict():
            raise ValueError(f"{folder} holds another dataset: {found}")
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    side, count = config.image_size, config.count
    for name, shape, dtype in (
        ("images", (count, side, side, 3), np.uint8),
        ("labels", (count, side, side), np.uint8),
        ("sizes", (count, 2), np.int16),
        ("families", (count, MAX_INSTANCES), np.int8),
    ):
        np.lib.format.open_memmap(folder / f"{name}.npy", "w+", dtype, shape).flush()
    bounds = np.linspace(0, count, 8 * max(1, workers) + 1).astype(int)
    jobs = [(folder, config, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if workers > 1 and count >= 64 * workers:  # fewer images render faster than processes start
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            pool.starmap(_render_range, jobs)
    else:
        for job in jobs:
            _render_range(*job)
    (folder / "meta.json").write_text(json.dumps(config.to_dict(), indent=2))
    return folder


class ShardDataset:
    """A rendered dataset, memory-mapped: nothing is read until an image is asked for."""

    def __init__(self, folder: Path) -> None:
        """Open the arrays of ``folder`` (a ``render`` output) read-only.

        Arguments:
          folder (Path): the dataset's folder.
        """
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.images = np.load(folder / "images.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        self.sizes = np.load(folder / "sizes.npy")
        self.families = np.load(folder / "families.npy")

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def image_size(self) -> int:
        """S, the side of the stored square frames."""
        return int(self.images.shape[1])

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``index`` unpadded: (hxwx3 uint8 image, hxw uint8 labels), fresh copies."""
        h, w = (int(v) for v in self.sizes[index])
        return np.array(self.images[index, :h, :w]), np.array(self.labels[index, :h, :w])


def main(argv: list[str] | None = None) -> int:
    """Command line: render a dataset (see the module docstring)."""
    defaults = RenderConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--count", type=int, default=defaults.count)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--root", type=Path, default=DATA_ROOT)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    config = dataclasses.replace(
        defaults, seed=args.seed, count=args.count, image_size=args.image_size
    )
    print(render(config, args.root, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
