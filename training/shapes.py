"""Synthetic scenes with many shape families, textures and backgrounds, some held out.

``training.synthetic`` draws the project's original four shape kinds (and its held-out set,
seed ``HELDOUT_SEED``, stays exactly as it was). This module draws scenes from a larger
catalogue, split in two so that a model can be measured on what it never saw:

* training families: the four original kinds, smooth random blobs, star-like and concave
  polygons, thin strokes, shapes with holes, letter and digit glyphs (DejaVu fonts),
  cell-like blobs that come in touching clusters, superellipses, compounds of overlapping
  parts and disc sectors;
* held-out families: crescents, gears, spirals, crosses and symbol glyphs (``&%@#?``...)
  from another typeface (Liberation fonts);
* training textures: the original ones, cell fills, hatching, marbled bands, radial
  gradients and speckle; training backgrounds: the original smooth ones, smooth ones crossed
  by curves, marbled waves, whole-image stripes, hatching or speckle, and fractal noise;
* held-out textures and backgrounds: checker, dot and ring fills, and tiled (Voronoi) and
  cluttered (thin straight lines and specks) backgrounds.

A scene is drawn like ``synthetic.make_sample``: objects are painted one after another, later
ones occlude earlier ones, each instance's mask is its visible region (masks are disjoint),
and a proposal is redrawn when it or an earlier instance would end up smaller than
``synthetic.min_area``. Sample ``i`` of seed ``s`` comes from ``np.random.default_rng([s, i])``
alone. Frames as in ``training.synthetic``: HxWx3 uint8 RGB images, NxHxW bool masks.
"""

from __future__ import annotations

import functools
import math
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import synthetic
from .synthetic import Sample, min_area, sample_size

TRAIN_FAMILIES = (
    "ellipse",
    "rectangle",
    "polygon",
    "ring",
    "blob",
    "star",
    "concave",
    "stroke",
    "holed",
    "glyph",
    "cell",
    "superellipse",
    "compound",
    "sector",
)
HELDOUT_FAMILIES = ("crescent", "gear", "spiral", "cross", "symbol")
TRAIN_TEXTURES = ("flat", "gradient", "stripes", "noise", "hatch", "marble", "radial", "speckle")
HELDOUT_TEXTURES = ("checker", "dots", "rings")
TRAIN_BACKGROUNDS = ("smooth", "curves", "waves", "patterned", "fractal")
HELDOUT_BACKGROUNDS = ("tiles", "clutter")

FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation")
"""Where Debian's fonts-dejavu-core, fonts-dejavu-extra and fonts-liberation put their TTFs."""
GLYPH_FONTS = "DejaVu"
SYMBOL_FONTS = "Liberation"
GLYPHS = string.ascii_letters + string.digits
SYMBOLS = "&%@#?$!§¶*+"

OUT_OF_FAMILY_SEED = 30_000
"""Seed of the out-of-family held-out set (held-out families, textures and backgrounds)."""


@dataclass(frozen=True)
class SceneConfig:
    """What a scene may contain.

    families, textures, backgrounds: the names drawn from (uniformly; see the module
    docstring for the catalogue). max_objects: most instances per image. size_range: an
    object's diameter as a fraction of the image's short side. p_neighbour: probability of
    placing an object against or over an earlier one. p_cluster: probability that a scene is
    a cluster of touching cells (when ``cell`` is a family).
    """

    families: tuple[str, ...] = TRAIN_FAMILIES
    textures: tuple[str, ...] = TRAIN_TEXTURES
    backgrounds: tuple[str, ...] = TRAIN_BACKGROUNDS
    max_objects: int = 8
    size_range: tuple[float, float] = (0.06, 0.55)
    p_neighbour: float = 0.35
    p_cluster: float = 0.15


TRAIN_SCENES = SceneConfig()
OUT_OF_FAMILY_SCENES = SceneConfig(
    families=HELDOUT_FAMILIES, textures=HELDOUT_TEXTURES, backgrounds=HELDOUT_BACKGROUNDS
)


@functools.cache
def font_files(prefix: str) -> tuple[str, ...]:
    """The TTF files in ``FONT_DIRS`` whose name starts with ``prefix``, sorted.

    Arguments:
      prefix (str): ``GLYPH_FONTS`` or ``SYMBOL_FONTS``.
    Returns:
      (tuple[str, ...]): paths; raises FileNotFoundError naming the Debian packages when none.
    """
    found = sorted(
        str(path)
        for folder in FONT_DIRS
        for path in Path(folder).glob(f"{prefix}*.ttf")
        if "Math" not in path.name  # a maths font has no ordinary letters at the usual size
    )
    if not found:
        raise FileNotFoundError(
            f"no {prefix} fonts in {FONT_DIRS}: apt-get install fonts-dejavu-core "
            "fonts-dejavu-extra fonts-liberation"
        )
    return tuple(found)


@functools.lru_cache(maxsize=256)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A font at a pixel size; cached since loading a TTF costs more than drawing a glyph."""
    return ImageFont.truetype(path, size)


def _polygon(vertices: np.ndarray) -> np.ndarray:
    """The pixels inside a polygon, as a bool crop around it.

    Arguments:
      vertices (np.ndarray): Vx2 (x, y) offsets from the shape's centre, in pixels.
    Returns:
      (np.ndarray): an (h, w) bool mask whose centre pixel is the shape's centre.
    """
    return _union([vertices])


def _union(parts: list[np.ndarray]) -> np.ndarray:
    """The pixels inside any of several polygons, as one bool crop centred on the origin.

    Arguments:
      parts (list[np.ndarray]): Vx2 (x, y) vertices of each polygon, offsets from the centre.
    Returns:
      (np.ndarray): an (h, w) bool mask whose centre pixel is the origin.
    """
    half = int(math.ceil(max(np.abs(p).max() for p in parts))) + 1
    canvas = Image.new("L", (2 * half + 1, 2 * half + 1), 0)
    draw = ImageDraw.Draw(canvas)
    for vertices in parts:
        draw.polygon([(x + half, y + half) for x, y in vertices], fill=1)
    return np.asarray(canvas).astype(bool)


def _radial(rng: np.random.Generator, radius: float, count: int, wobble: float) -> np.ndarray:
    """A smooth closed outline: r(t) = radius (1 + sum of a few low harmonics), Vx2 (x, y).

    Arguments:
      rng (np.random.Generator): the scene's generator.
      radius (float): mean radius in pixels.
      count (int): vertices on the outline.
      wobble (float): largest relative amplitude of each harmonic.
    """
    turns = np.linspace(0.0, 2.0 * math.pi, count, endpoint=False)
    r = np.ones(count)
    for harmonic in range(2, 6):
        amplitude = rng.uniform(0.0, wobble) / math.sqrt(harmonic - 1)
        r += amplitude * np.cos(harmonic * turns + rng.uniform(0.0, 2.0 * math.pi))
    r = radius * np.clip(r, 0.25, None)
    return np.stack([r * np.cos(turns), r * np.sin(turns)], axis=1)


def _rotate(vertices: np.ndarray, angle: float) -> np.ndarray:
    """Vx2 (x, y) points rotated by ``angle`` radians about the origin."""
    c, s = math.cos(angle), math.sin(angle)
    return vertices @ np.array([[c, s], [-s, c]])


def _stroke(points: np.ndarray, width: int) -> np.ndarray:
    """A polyline drawn ``width`` pixels wide with round joints, as a bool crop centred on
    the origin of the Vx2 (x, y) ``points``."""
    half = int(math.ceil(np.abs(points).max() + width)) + 1
    canvas = Image.new("L", (2 * half + 1, 2 * half + 1), 0)
    ImageDraw.Draw(canvas).line(
        [(x + half, y + half) for x, y in points], fill=1, width=width, joint="curve"
    )
    return np.asarray(canvas).astype(bool)


def _smooth_curve(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A smooth random open curve within ``radius`` of the origin: Vx2 (x, y) points of a
    Catmull-Rom spline through 3-5 random control points."""
    controls = rng.uniform(-radius, radius, size=(int(rng.integers(3, 6)), 2))
    padded = np.concatenate([controls[:1], controls, controls[-1:]])
    t = np.linspace(0.0, 1.0, 12)[:, None]
    pieces = []
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1 : i + 3]
        pieces.append(
            0.5
            * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
        )
    return np.concatenate(pieces)


def _glyph(rng: np.random.Generator, radius: float, fonts: str, characters: str) -> np.ndarray:
    """One character of a random font of ``fonts``, about 2 x ``radius`` tall, rotated.

    Returns:
      (np.ndarray): a bool crop of the glyph's pixels (at least one pixel set).
    """
    path = font_files(fonts)[int(rng.integers(len(font_files(fonts))))]
    size = max(8, 4 * round(radius / 2))  # a few sizes, so the font cache serves them
    character = characters[int(rng.integers(len(characters)))]
    font = _font(path, size)
    left, top, right, bottom = font.getbbox(character)
    canvas = Image.new("L", (max(1, right - left) + 2, max(1, bottom - top) + 2), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), character, font=font, fill=255)
    angle = float(rng.uniform(-180.0, 180.0)) if rng.random() < 0.5 else 0.0
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    mask = np.asarray(canvas) >= 128
    return mask if mask.any() else np.ones((3, 3), bool)


def _cross(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A plus, T or L shape of two bars, arms ``radius`` long, as Vx2 polygons' union."""
    arm = radius * rng.uniform(0.15, 0.35)
    kind = int(rng.integers(3))
    horizontal = np.array([[-radius, -arm], [radius, -arm], [radius, arm], [-radius, arm]])
    if kind == 1:  # T: the vertical bar hangs from the horizontal one
        vertical = np.array([[-arm, -arm], [arm, -arm], [arm, radius], [-arm, radius]])
    elif kind == 2:  # L: both bars start at a corner
        horizontal = np.array([[-radius, radius - 2 * arm], [radius, radius - 2 * arm]])
        horizontal = np.concatenate([horizontal, [[radius, radius], [-radius, radius]]])
        vertical = np.array([[-radius, -radius], [2 * arm - radius, -radius]])
        vertical = np.concatenate([vertical, [[2 * arm - radius, radius], [-radius, radius]]])
    else:
        vertical = horizontal[:, ::-1]
    angle = rng.uniform(0.0, math.pi)
    return _polygon(_rotate(horizontal, angle)) | _polygon(_rotate(vertical, angle))


def _gear(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A gear: 6-14 square teeth around a disc, sometimes with an axle hole."""
    teeth = int(rng.integers(6, 15))
    inner = rng.uniform(0.65, 0.85)
    turns = np.linspace(0.0, 2.0 * math.pi, 4 * teeth, endpoint=False) + rng.uniform(0, math.pi)
    r = radius * np.where((np.arange(4 * teeth) // 2) % 2 == 0, 1.0, inner)
    mask = _polygon(np.stack([r * np.cos(turns), r * np.sin(turns)], axis=1))
    if rng.random() < 0.5:
        mask &= ~_disc_like(mask.shape, radius * rng.uniform(0.15, 0.3), 0.0, 0.0)
    return mask


def _disc_like(shape: tuple[int, int], radius: float, dy: float, dx: float) -> np.ndarray:
    """A disc of ``radius`` whose centre is (dy, dx) from the centre of an ``shape`` crop."""
    cy, cx = (shape[0] - 1) / 2 + dy, (shape[1] - 1) / 2 + dx
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2


def _crescent(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A disc minus a shifted disc: a crescent with two sharp horns."""
    size = 2 * int(math.ceil(radius)) + 3
    disc = _disc_like((size, size), radius, 0.0, 0.0)
    heading = rng.uniform(0.0, 2.0 * math.pi)
    shift = radius * rng.uniform(0.3, 0.7)
    bite = _disc_like(
        (size, size),
        radius * rng.uniform(0.7, 1.0),
        shift * math.sin(heading),
        shift * math.cos(heading),
    )
    return disc & ~bite


def _spiral(rng: np.random.Generator, radius: float) -> np.ndarray:
    """An Archimedean spiral of 1.5-3 turns drawn as a thick line."""
    turns = rng.uniform(1.5, 3.0)
    t = np.linspace(0.0, turns * 2.0 * math.pi, int(40 * turns))
    r = radius * (0.1 + 0.9 * t / t[-1])
    points = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    gap = radius / turns
    width = max(2, int(gap * rng.uniform(0.25, 0.5)))
    return _stroke(_rotate(points, rng.uniform(0.0, 2.0 * math.pi)), width)


def _superellipse(rng: np.random.Generator, radius: float) -> np.ndarray:
    """|x/a|^n + |y/b|^n <= 1 for n in 0.6-4: from a four-horned astroid (n < 1) through a
    diamond to a rounded rectangle, rotated."""
    n = rng.uniform(0.6, 4.0)
    turns = np.linspace(0.0, 2.0 * math.pi, 96, endpoint=False)
    c, s = np.cos(turns), np.sin(turns)
    x = radius * np.sign(c) * np.abs(c) ** (2.0 / n)
    y = radius * rng.uniform(0.4, 1.0) * np.sign(s) * np.abs(s) ** (2.0 / n)
    return _polygon(_rotate(np.stack([x, y], axis=1), rng.uniform(0.0, math.pi)))


def _compound(rng: np.random.Generator, radius: float) -> np.ndarray:
    """2-4 overlapping ellipses and rectangles joined into one object, each part overlapping
    the one before, so the union is connected with concave joints."""
    parts, centre, previous = [], np.zeros(2), 0.0
    for index in range(int(rng.integers(2, 5))):
        size = radius * rng.uniform(0.3, 0.55)
        if index:
            heading = rng.uniform(0.0, 2.0 * math.pi)
            reach = (previous + size) * rng.uniform(0.3, 0.7)
            centre = centre + reach * np.array([math.cos(heading), math.sin(heading)])
        if rng.random() < 0.5:
            turns = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
            outline = np.stack([np.cos(turns), rng.uniform(0.4, 1.0) * np.sin(turns)], axis=1)
        else:
            outline = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
            outline = outline * [1.0, rng.uniform(0.3, 1.0)]
        parts.append(centre + _rotate(size * outline, rng.uniform(0.0, math.pi)))
        previous = size
    middle = np.concatenate(parts).mean(axis=0)  # re-centre so the crop centre is the object's
    return _union([p - middle for p in parts])


def _sector(rng: np.random.Generator, radius: float) -> np.ndarray:
    """A disc's sector (pie slice) of 40-300 degrees, rotated."""
    span = math.radians(rng.uniform(40.0, 300.0))
    start = rng.uniform(0.0, 2.0 * math.pi)
    turns = start + np.linspace(0.0, span, max(8, int(48 * span / math.pi)))
    arc = radius * np.stack([np.cos(turns), np.sin(turns)], axis=1)
    return _polygon(np.concatenate([[[0.0, 0.0]], arc]))


_DRAWN_BY_RADIUS: dict[str, Callable[[np.random.Generator, float], np.ndarray]] = {
    "crescent": _crescent,
    "gear": _gear,
    "spiral": _spiral,
    "cross": _cross,
    "superellipse": _superellipse,
    "compound": _compound,
    "sector": _sector,
}
"""The families drawn by one function of the generator and the radius alone."""


def family_mask(rng: np.random.Generator, family: str, radius: float) -> np.ndarray:
    """A shape of ``family`` about ``radius`` pixels in radius, as a bool crop centred on it.

    Arguments:
      rng (np.random.Generator): the scene's generator (advanced).
      family (str): one of ``TRAIN_FAMILIES`` or ``HELDOUT_FAMILIES``.
      radius (float): half the shape's diameter, in pixels.
    Returns:
      (np.ndarray): an (h, w) bool mask; the crop's centre pixel is the shape's centre.
    """
    angle = rng.uniform(0.0, 2.0 * math.pi)
    if family in ("ellipse", "rectangle", "polygon", "ring"):
        return _classic(rng, family, radius)
    if family in ("blob", "cell"):
        wobble = 0.35 if family == "blob" else 0.08
        return _polygon(_radial(rng, radius, 64, wobble) * [1.0, rng.uniform(0.6, 1.0)])
    if family == "star":
        points = int(rng.integers(4, 11))
        turns = np.linspace(0.0, 2.0 * math.pi, 2 * points, endpoint=False) + angle
        r = radius * np.where(np.arange(2 * points) % 2 == 0, 1.0, rng.uniform(0.3, 0.6))
        return _polygon(np.stack([r * np.cos(turns), r * np.sin(turns)], axis=1))
    if family == "concave":
        count = int(rng.integers(7, 15))
        turns = np.sort(rng.uniform(0.0, 2.0 * math.pi, count))
        r = radius * rng.uniform(0.25, 1.0, count)
        return _polygon(np.stack([r * np.cos(turns), r * np.sin(turns)], axis=1))
    if family == "stroke":
        width = max(2, int(radius * rng.uniform(0.08, 0.25)))
        return _stroke(_smooth_curve(rng, radius), width)
    if family == "holed":
        mask = _polygon(_radial(rng, radius, 64, 0.2))
        for _ in range(int(rng.integers(1, 4))):
            r = radius * rng.uniform(0.12, 0.3)
            heading, shift = rng.uniform(0.0, 2.0 * math.pi), rng.uniform(0.0, radius * 0.45)
            mask &= ~_disc_like(mask.shape, r, shift * math.sin(heading), shift * math.cos(heading))
        return mask
    if family == "glyph":
        return _glyph(rng, radius, GLYPH_FONTS, GLYPHS)
    if family == "symbol":
        return _glyph(rng, radius, SYMBOL_FONTS, SYMBOLS)
    if family in _DRAWN_BY_RADIUS:
        return _DRAWN_BY_RADIUS[family](rng, radius)
    raise ValueError(
        f"unknown family {family!r}: expected one of {TRAIN_FAMILIES + HELDOUT_FAMILIES}"
    )


def _classic(rng: np.random.Generator, kind: str, radius: float) -> np.ndarray:
    """One of ``training.synthetic``'s kinds (with its proportions), drawn by its own
    rasteriser, as a crop centred on it."""
    angle = rng.uniform(0.0, math.pi)
    a, b, inner, vertices = radius, radius, 0.0, ()
    if kind == "ellipse":
        b = radius * rng.uniform(0.35, 1.0)
    elif kind == "rectangle":
        b = radius * rng.uniform(0.3, 1.0)
    elif kind == "ring":
        b, inner = max(radius * rng.uniform(0.6, 1.0), min(5.0, radius)), rng.uniform(0.4, 0.7)
    else:
        count = int(rng.integers(3, 9))
        turns = angle + (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * 2 * math.pi / count
        radii = radius * (np.ones(count) if rng.random() < 0.5 else rng.uniform(0.4, 1.0, count))
        vertices = tuple(zip((radii * np.cos(turns)).tolist(), (radii * np.sin(turns)).tolist()))
    size = 2 * int(math.ceil(radius)) + 3
    centre = (size - 1) / 2
    shape = synthetic._Geometry(kind, centre, centre, a, b, angle, radius, inner, vertices)
    raster = synthetic._rasterise(shape, size, size)
    full = np.zeros((size, size), bool)
    if raster is not None:
        y0, x0, mask = raster
        full[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask
    return full


def _texture(
    rng: np.random.Generator, texture: str, colour: np.ndarray, pixels: synthetic.Pixels
) -> np.ndarray:
    """The fill of an object's n ``pixels`` (offsets from its centre).

    Arguments:
      texture (str): one of ``TRAIN_TEXTURES`` or ``HELDOUT_TEXTURES``.
      colour (np.ndarray): (3,) base RGB colour.
    Returns:
      (np.ndarray): (n, 3) uint8 RGB.
    """
    dy, dx, radius = pixels.dy, pixels.dx, pixels.radius
    if texture in synthetic.TEXTURES:
        return synthetic._fill(rng, texture, colour, pixels)
    base = np.round(colour).astype(np.float32)
    other = np.clip(base + synthetic._random_direction(rng, rng.uniform(50.0, 110.0)), 0, 255)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    u = dx * np.float32(math.cos(angle)) + dy * np.float32(math.sin(angle))
    v = dy * np.float32(math.cos(angle)) - dx * np.float32(math.sin(angle))
    period = np.float32(max(4.0, radius * rng.uniform(0.15, 0.5)))
    if texture in ("hatch", "marble", "radial", "speckle"):
        share = _training_pattern(rng, texture, pixels, u, v, period)
        return _mix(base, other, share)
    if texture == "checker":
        second = (np.floor(u / period) + np.floor(v / period)) % 2 == 1
    elif texture == "dots":
        fu, fv = u / period - np.round(u / period), v / period - np.round(v / period)
        second = fu**2 + fv**2 < rng.uniform(0.04, 0.16)
    elif texture == "rings":
        second = np.floor(np.sqrt(dy**2 + dx**2) / (0.6 * period)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}")
    values = np.where(second[:, None], other, base)  # not _mix: keeps the held-out set's bytes
    return (np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _training_pattern(
    rng: np.random.Generator,
    texture: str,
    pixels: synthetic.Pixels,
    u: np.ndarray,
    v: np.ndarray,
    period: float,
) -> np.ndarray:
    """How much of the second colour each pixel of a training-only fill takes, (n,) in [0, 1].

    hatch: thin parallel lines, sometimes crossed; marble: wavy bands that blend smoothly;
    radial: a gradient out from a point inside the object; speckle: random pixels.
    ``u``, ``v`` are the pixels' coordinates along a random direction and across it, and
    ``period`` the pattern's scale in pixels.
    """
    dy, dx, radius = pixels.dy, pixels.dx, pixels.radius
    if texture == "hatch":
        width = rng.uniform(0.15, 0.4)
        lines = (u / period) % 1.0 < width
        if rng.random() < 0.5:
            lines |= (v / period) % 1.0 < width
        return lines.astype(np.float32)
    if texture == "marble":
        wobble = rng.uniform(0.5, 3.0) * np.sin(v / (period * rng.uniform(1.0, 3.0)))
        return (0.5 + 0.5 * np.sin(u / period * math.pi + wobble)).astype(np.float32)
    if texture == "radial":
        cy, cx = rng.uniform(-0.5, 0.5, 2) * radius
        distance = np.sqrt((dy - cy) ** 2 + (dx - cx) ** 2) / np.float32(1.5 * max(radius, 1.0))
        return np.clip(distance, 0.0, 1.0).astype(np.float32)
    if texture == "speckle":
        return (rng.random(dy.size) < rng.uniform(0.05, 0.3)).astype(np.float32)
    raise ValueError(f"unknown texture {texture!r}")


def _mix(base: np.ndarray, other: np.ndarray, share: np.ndarray) -> np.ndarray:
    """(n, 3) uint8 pixels blending (3,) colours ``base`` and ``other`` by (n,) ``share``."""
    values = base + share[:, None] * (other - base)
    return (np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` (h, w) bool eroded ``steps`` times by the 4-neighbourhood (edges count as out)."""
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:] &= out[:-1]
        inner[:-1] &= out[1:]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        inner[[0, -1]] = False
        inner[:, [0, -1]] = False
        out = inner
    return out


def _cell_fill(
    rng: np.random.Generator, colour: np.ndarray, mask: np.ndarray, radius: float
) -> np.ndarray:
    """A cell's look: noisy cytoplasm, a darker membrane along the edge and a nucleus.

    Arguments:
      colour (np.ndarray): (3,) cytoplasm RGB.
      mask (np.ndarray): (h, w) bool, the cell's visible pixels in its crop.
      radius (float): the cell's radius in pixels.
    Returns:
      (np.ndarray): (count of mask, 3) uint8 RGB for the mask's pixels in row-major order.
    """
    sigma = np.float32(rng.uniform(4.0, 14.0))
    count = int(mask.sum())
    values = np.round(colour).astype(np.float32) + sigma * synthetic._standard_normals(
        rng, 3 * count
    ).reshape(count, 3)
    shade = synthetic._random_direction(rng, rng.uniform(30.0, 80.0))
    membrane = ~_erode(mask, max(1, int(radius * rng.uniform(0.06, 0.15))))[mask]
    values[membrane] -= np.abs(shade)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + rng.normal(0, radius * 0.1), xs.mean() + rng.normal(0, radius * 0.1)
    nucleus = (ys - cy) ** 2 + (xs - cx) ** 2 <= (radius * rng.uniform(0.25, 0.45)) ** 2
    values[nucleus] += shade
    return (np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def _tiles(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A Voronoi mosaic of 8-60 flat tiles of related colours with pixel noise, HxWx3 uint8."""
    count = int(rng.integers(8, 61))
    seeds = rng.uniform(0.0, 1.0, (count, 2)) * [height, width]
    base = rng.uniform(50.0, 205.0, 3)
    colours = np.clip(base + rng.normal(0.0, rng.uniform(15.0, 50.0), (count, 3)), 0, 255)
    ys = np.arange(height, dtype=np.float32)[:, None, None]
    nearest = np.empty((height, width), np.int64)
    for top in range(0, height, 64):  # rows in blocks: the distance array stays small
        block = ys[top : top + 64]
        d = (block - seeds[:, 0].astype(np.float32)) ** 2 + (
            np.arange(width, dtype=np.float32)[None, :, None] - seeds[:, 1].astype(np.float32)
        ) ** 2
        nearest[top : top + 64] = d.argmin(axis=2)
    image = colours[nearest].astype(np.float32)
    sigma = np.float32(rng.uniform(3.0, 12.0))
    image += sigma * synthetic._standard_normals(rng, image.size).reshape(image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth background crossed by 30-150 thin lines and specks, HxWx3 uint8."""
    canvas = Image.fromarray(synthetic._background(rng, height, width))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(30, 151))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.6:
            length, angle = rng.uniform(5, 0.3 * min(height, width)), rng.uniform(0, math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(1.0, 4.0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(canvas).copy()


def _noisy(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """An HxWx3 float image with per-pixel Gaussian noise (sigma 3-12), as uint8."""
    sigma = np.float32(rng.uniform(3.0, 12.0))
    image = image + sigma * synthetic._standard_normals(rng, image.size).reshape(image.shape)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _curves(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth background crossed by 5-40 smooth curves 1-8 px wide, HxWx3 uint8."""
    canvas = Image.fromarray(synthetic._background(rng, height, width))
    draw = ImageDraw.Draw(canvas)
    reach = 0.5 * max(height, width)
    for _ in range(int(rng.integers(5, 41))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        points = _smooth_curve(rng, reach) + [rng.uniform(0, width), rng.uniform(0, height)]
        draw.line([tuple(p) for p in points], fill=colour, width=int(rng.integers(1, 9)))
    return np.asarray(canvas).copy()


def _pattern_field(rng: np.random.Generator, height: int, width: int, texture: str) -> np.ndarray:
    """A training fill painted over a whole HxW image, HxWx3 uint8."""
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    pixels = synthetic.Pixels(
        (ys - height / 2).ravel(), (xs - width / 2).ravel(), 0.5 * min(height, width)
    )
    colour = rng.uniform(30.0, 225.0, 3)
    return _texture(rng, texture, colour, pixels).reshape(height, width, 3)


def _waves(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Wavy marbled bands of two colours over the whole image, with pixel noise."""
    return _noisy(rng, _pattern_field(rng, height, width, "marble").astype(np.float32))


def _patterned(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A high-contrast stripe, hatch or speckle pattern over the whole image, HxWx3 uint8."""
    texture = ("stripes", "hatch", "speckle")[int(rng.integers(3))]
    return _pattern_field(rng, height, width, texture)


def _fractal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Value noise summed over 4 octaves (knots doubling, amplitude halving), colour-mapped
    between two random colours, with pixel noise: a rough, natural-looking texture."""
    field = np.zeros((height, width), np.float32)
    knots, amplitude = int(rng.integers(3, 7)), 1.0
    for _ in range(4):
        grid = rng.uniform(-amplitude, amplitude, (knots, knots)).astype(np.float32)
        along_y = synthetic._interpolation_matrix(height, knots)
        along_x = synthetic._interpolation_matrix(width, knots)
        field += along_y @ grid @ along_x.T
        knots, amplitude = knots * 2, amplitude * rng.uniform(0.4, 0.7)
    share = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
    low, high = rng.uniform(0.0, 255.0, (2, 3)).astype(np.float32)
    return _noisy(rng, low + share[..., None] * (high - low))


BACKGROUNDS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "smooth": synthetic._background,
    "curves": _curves,
    "waves": _waves,
    "patterned": _patterned,
    "fractal": _fractal,
    "tiles": _tiles,
    "clutter": _clutter,
}
"""Background painters by name: ``smooth`` is ``training.synthetic``'s."""


def _paste(crop: np.ndarray, cy: float, cx: float, height: int, width: int):
    """Where a centred ``crop`` lands in an HxW image with its centre at (cy, cx).

    Returns:
      (tuple | None): (y0, x0, visible crop) with the part inside the image, or None.
    """
    top = int(round(cy - (crop.shape[0] - 1) / 2))
    left = int(round(cx - (crop.shape[1] - 1) / 2))
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(height, top + crop.shape[0]), min(width, left + crop.shape[1])
    if y0 >= y1 or x0 >= x1:
        return None
    return y0, x0, crop[y0 - top : y1 - top, x0 - left : x1 - left]


def make_scene(
    rng: np.random.Generator, height: int, width: int, scenes: SceneConfig = TRAIN_SCENES
) -> Sample:
    """One HxW scene drawn from (and advancing) ``rng``.

    Arguments:
      rng (np.random.Generator): the sample's generator.
      height, width (int): the image size, each at least ``synthetic.MIN_SIDE``.
      scenes (SceneConfig): the families, textures and backgrounds allowed.
    Returns:
      (Sample): HxWx3 uint8 image, NxHxW disjoint visible masks, N family names.
    """
    if height < synthetic.MIN_SIDE or width < synthetic.MIN_SIDE:
        raise ValueError(f"image must be at least {synthetic.MIN_SIDE} px a side")
    background = scenes.backgrounds[int(rng.integers(len(scenes.backgrounds)))]
    image = BACKGROUNDS[background](rng, height, width)
    cluster = "cell" in scenes.families and rng.random() < scenes.p_cluster
    target = int(rng.integers(3 if cluster else 1, scenes.max_objects + 1))
    instances = synthetic.Instances(height, width, min_area(height, width))
    centres: list[tuple[float, float, float]] = []  # (cy, cx, radius) of each instance
    kinds: list[str] = []
    short = min(height, width)
    for attempt in range(40 * scenes.max_objects):
        if len(kinds) == target or (kinds and attempt >= 8 * target + 20):
            break
        family = "cell" if cluster else scenes.families[int(rng.integers(len(scenes.families)))]
        low, high = (0.08, 0.2) if cluster else scenes.size_range
        radius = max(3.0, 0.5 * rng.uniform(low, high) * short)
        crop = family_mask(rng, family, radius)
        if centres and (cluster or rng.random() < scenes.p_neighbour):
            cy, cx, other = centres[int(rng.integers(len(centres)))]
            reach = (other + radius) * (
                rng.uniform(0.85, 1.0) if cluster else rng.uniform(0.3, 1.05)
            )
            heading = rng.uniform(0.0, 2.0 * math.pi)
            cy, cx = cy + reach * math.sin(heading), cx + reach * math.cos(heading)
        else:
            cy, cx = rng.uniform(0.0, height), rng.uniform(0.0, width)
        placed = _paste(crop, cy, cx, height, width)
        window = instances.window(placed)
        if window is None:
            continue
        y0, x0, mask = placed
        image_crop = image[window]
        colour = synthetic._choose_colour(rng, image_crop[::3, ::3].reshape(-1, 3).mean(axis=0))
        if family == "cell":
            image_crop[mask] = _cell_fill(rng, colour, mask, radius)
        else:
            texture = scenes.textures[int(rng.integers(len(scenes.textures)))]
            pixels = synthetic.Pixels.of(mask, y0 - cy, x0 - cx, radius)
            image_crop[mask] = _texture(rng, texture, colour, pixels)
        instances.add(window, mask)
        centres.append((cy, cx, radius))
        kinds.append(family)
    if not kinds:
        raise RuntimeError(f"could not place any object in {height}x{width}")
    return Sample(image=image, masks=instances.masks(), kinds=tuple(kinds))


def scenes_dataset(
    seed: int,
    count: int,
    long_side: tuple[int, int] = (300, 900),
    scenes: SceneConfig = TRAIN_SCENES,
) -> Iterator[Sample]:
    """``count`` scenes; scene i comes from ``np.random.default_rng([seed, i])`` alone.

    Arguments:
      seed (int): the stream (``OUT_OF_FAMILY_SEED`` for the out-of-family held-out set).
      count (int): how many scenes.
      long_side (tuple[int, int]): the inclusive range of the image's long side.
      scenes (SceneConfig): what the scenes may contain.
    """
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        height, width = sample_size(rng, long_side)
        yield make_scene(rng, height, width, scenes)


def out_of_family(count: int) -> list[Sample]:
    """The out-of-family held-out set: held-out families, textures and backgrounds only,
    300-900 px long side (as the project's held-out set), seed ``OUT_OF_FAMILY_SEED``."""
    return list(scenes_dataset(OUT_OF_FAMILY_SEED, count, (300, 900), OUT_OF_FAMILY_SCENES))


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "/tmp/scenes_grid.png"
    train = list(scenes_dataset(1, 8, (200, 320)))
    held = list(scenes_dataset(OUT_OF_FAMILY_SEED, 4, (200, 320), OUT_OF_FAMILY_SCENES))
    Image.fromarray(synthetic.outline_preview(train + held, columns=4)).save(target)
    print(f"wrote {target}")
