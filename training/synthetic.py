"""Deterministic synthetic instance-segmentation data for training and evaluating a small SAM.

Every sample is a textured, noisy background with 1..max_objects filled shapes (ellipses,
rotated rectangles, star-shaped or convex polygons, rings) drawn in order, so later objects
occlude earlier ones. Each instance's mask is exactly the set of pixels painted with that
object's fill and not covered later: masks never overlap and agree with the image pixel for
pixel (no anti-aliasing). A ring's hole shows what lies beneath, so its mask has a hole.

Determinism: sample ``i`` of ``dataset(seed, ...)`` is drawn from
``np.random.default_rng([seed, i])`` and depends only on ``(seed, i)`` (and the arguments),
never on how many samples are requested or on which were drawn before.

Seeds: ``HELDOUT_SEED`` names the held-out evaluation set. Training must NEVER use it; training
draws from ``TRAIN_SEED``, ``TRAIN_SEED + 1``, ... (one seed per epoch or worker, say), all
below ``HELDOUT_SEED``. Seeds only matter as a whole: ``[0, i]`` and ``[10_000, j]`` are
unrelated streams, so any other seed is disjoint from the held-out set.

Frames: images are HxWx3 uint8 RGB, row-major; pixel ``(y, x)`` has its centre at integer
coordinates ``(y, x)``. Masks are NxHxW bool in the same frame.

Only numpy and Pillow; tuned for speed (about 2-3 ms for 256x256 and 12-15 ms for 900x700 on
one core): the smooth background is a low-rank matrix product, Gaussian noise comes from slices
of a fixed bank of normals, shapes are rasterised on their bounding-box crop, and full-size
temporaries are avoided. Pixel values go through float32 BLAS, so another CPU or BLAS build
may change a few by one; masks use exact arithmetic only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("ellipse", "rectangle", "polygon", "ring")
TEXTURES = ("flat", "gradient", "stripes", "noise")

TRAIN_SEED = 0
"""First training seed; training uses seeds TRAIN_SEED, TRAIN_SEED + 1, ... < HELDOUT_SEED."""
HELDOUT_SEED = 10_000
"""Seed of the held-out evaluation set. Training must never use this seed."""
VALIDATION_SEED = 20_000
"""Seed of the validation set that settings (such as counting thresholds) are chosen on, so
that the held-out set only ever measures. Training must not use it either."""

MIN_SIDE = 32
"""Smallest image side make_sample accepts."""
MIN_AREA_FRACTION = 0.003
MIN_AREA_PIXELS = 30
"""Every instance keeps at least max(MIN_AREA_PIXELS, MIN_AREA_FRACTION * H * W) pixels."""
SIZE_RANGE = (0.08, 0.45)
"""Object diameter (long axis) as a fraction of the image's short side."""
P_NEIGHBOUR = 0.3
"""Probability of placing an object next to or over an existing one."""
P_LOW_CONTRAST = 0.15
"""Probability that an object's colour is close to what lies beneath it."""
NOISE_BANK_SIZE = 1 << 22
"""Size of the shared bank of Gaussian noise (16 MiB of float32)."""
_MAX_ATTEMPTS = 1000


@dataclass(frozen=True, eq=False)
class Sample:
    """One synthetic image with its instances.

    image: HxWx3 uint8 RGB. masks: NxHxW bool, N >= 1, the visible region of each instance
    (pairwise disjoint, each non-empty). kinds: N shape kinds, each one of KINDS.
    """

    image: np.ndarray
    masks: np.ndarray
    kinds: tuple[str, ...]

    def __post_init__(self) -> None:
        """Check shapes and dtypes; a malformed sample is a bug, not data."""
        if self.image.dtype != np.uint8 or self.image.ndim != 3 or self.image.shape[2] != 3:
            raise ValueError(
                f"image must be HxWx3 uint8, got {self.image.shape}/{self.image.dtype}"
            )
        if self.masks.dtype != np.bool_ or self.masks.shape[1:] != self.image.shape[:2]:
            raise ValueError(f"masks must be NxHxW bool, got {self.masks.shape}/{self.masks.dtype}")
        if len(self.kinds) != len(self.masks) or not self.kinds:
            raise ValueError(f"need N >= 1 kinds for {len(self.masks)} masks, got {self.kinds}")


@dataclass(frozen=True)
class _Geometry:
    """A shape in image coordinates (pixels, y down, angles in radians from the +x axis).

    a, b: semi-axes (ellipse, ring) or half-sides (rectangle) along the rotated u and v axes;
    inner: the ring's hole as a fraction of its outer semi-axes; vertices: polygon offsets from
    the centre as (x, y) pairs; radius: a typical radius, used to place neighbours.
    """

    kind: str
    cy: float
    cx: float
    a: float
    b: float
    angle: float
    radius: float
    inner: float = 0.0
    vertices: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class _Placed:
    """An object as drawn: its geometry, fill texture and base colour (RGB uint8 values)."""

    geometry: _Geometry
    texture: str
    colour: tuple[int, int, int]


@functools.cache
def _noise_bank() -> np.ndarray:
    """NOISE_BANK_SIZE float32 standard normals from a fixed seed (made once per process)."""
    return np.random.default_rng(0x5EED).standard_normal(NOISE_BANK_SIZE, dtype=np.float32)


def _standard_normals(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` standard normal values, (count,) float32, possibly a read-only view.

    Slices of a fixed bank of normals at offsets drawn from `rng`: much faster than rng.normal,
    and within a sample the values are independent; only different samples may reuse (shifted)
    stretches of the bank, which is harmless for training.
    """
    bank = _noise_bank()
    pieces = []
    for start in range(0, count, bank.size):
        length = min(bank.size, count - start)
        offset = int(rng.integers(0, bank.size - length + 1))
        pieces.append(bank[offset : offset + length])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _interpolation_matrix(size: int, knots: int) -> np.ndarray:
    """Smoothstep interpolation from `knots` evenly spaced knots onto `size` pixels.

    Returns a (size, knots) float32 matrix whose rows sum to 1.
    """
    position = np.linspace(0.0, knots - 1.0, size)
    left = np.minimum(position.astype(np.int64), knots - 2)
    t = position - left
    t = t * t * (3.0 - 2.0 * t)
    matrix = np.zeros((size, knots), dtype=np.float32)
    rows = np.arange(size)
    matrix[rows, left] = 1.0 - t
    matrix[rows, left + 1] = t
    return matrix


def _wave_terms(
    height: int, width: int, kx: float, ky: float, phase: float, colour: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """cos(kx * x + ky * y + phase) * colour as two separable terms (see _background).

    Each term is (column (H,) float32, row (W, 3) float32); their outer products sum to the
    plane wave, HxWx3: cos(A + B) = cos A cos B - sin A sin B with A in x and B in y.
    """
    x_phase = kx * np.arange(width, dtype=np.float32) + phase
    y_phase = ky * np.arange(height, dtype=np.float32)
    return [
        (np.cos(y_phase), np.cos(x_phase)[:, None] * colour),
        (-np.sin(y_phase), np.sin(x_phase)[:, None] * colour),
    ]


def _random_direction(rng: np.random.Generator, norm: float) -> np.ndarray:
    """A (3,) float32 RGB offset of the given norm, mostly towards grey (brightness)."""
    vector = rng.normal(size=3) + (1.5 * rng.normal()) * np.ones(3)
    return (norm * vector / max(float(np.linalg.norm(vector)), 1e-6)).astype(np.float32)


def _small_matmuls(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """left @ right for (M, K) and (K, N) float32, in row blocks of at most ~2**18 multiply-adds.

    OpenBLAS runs GEMMs of up to 2**18 multiply-adds on the calling thread; a larger one wakes
    its thread pool, which in a data-loader worker (or next to a busy core) oversubscribes the
    CPU and made a 256x256 sample take 15 ms instead of 3.
    """
    rows = max(1, (1 << 18) // max(1, right.shape[0] * right.shape[1]))
    out = np.empty((left.shape[0], right.shape[1]), dtype=np.float32)
    for start in range(0, left.shape[0], rows):
        np.matmul(left[start : start + rows], right, out=out[start : start + rows])
    return out


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A non-uniform noisy background, HxWx3 uint8 RGB.

    One primary style (colour gradient, blotches of upsampled low-resolution noise, low-contrast
    soft stripes or a checker) plus sometimes a weaker second layer, then per-pixel Gaussian
    noise with sigma in 3-15. The smooth part is a sum of K separable terms column(y) x
    row(x, c), computed as an (H, K) @ (K, W*3) matrix product.
    """
    style = int(rng.integers(4))
    base = rng.uniform(40.0, 215.0, size=3).astype(np.float32) + np.float32(0.5)  # + rounding
    terms: list[tuple[np.ndarray, np.ndarray]] = [
        (np.ones(height, np.float32), np.broadcast_to(base, (width, 3)))
    ]
    if style == 0 or rng.random() < 0.3:  # linear colour gradient across the image
        angle = rng.uniform(0.0, 2.0 * math.pi)
        span = abs(math.cos(angle)) * width + abs(math.sin(angle)) * height
        delta = _random_direction(rng, rng.uniform(40.0, 110.0) if style == 0 else 30.0)
        ys = np.arange(height, dtype=np.float32) * np.float32(math.sin(angle) / span)
        xs = np.arange(width, dtype=np.float32) * np.float32(math.cos(angle) / span)
        terms.append((ys, np.broadcast_to(delta, (width, 3))))
        terms.append((np.ones(height, np.float32), xs[:, None] * delta))
    if style == 1 or rng.random() < 0.35:  # blotches: upsampled small random noise
        amplitude = rng.uniform(25.0, 60.0) if style == 1 else rng.uniform(8.0, 25.0)
        knots_y, knots_x = (int(k) for k in rng.integers(2, 8, size=2))
        grid = rng.uniform(-amplitude, amplitude, size=(knots_y, knots_x, 3)).astype(np.float32)
        along_y = _interpolation_matrix(height, knots_y)
        along_x = _interpolation_matrix(width, knots_x)
        terms.extend((along_y[:, k], along_x @ grid[k]) for k in range(knots_y))
    if style in (2, 3):  # low-contrast soft-edged stripes or checker (few odd harmonics)
        period = rng.uniform(8.0, 48.0)
        angle = rng.uniform(0.0, math.pi)
        colour = _random_direction(rng, rng.uniform(6.0, 22.0))
        k = 2.0 * math.pi / period
        ux, uy = k * math.cos(angle), k * math.sin(angle)
        if style == 2:
            for harmonic in (1, 3, 5):
                terms += _wave_terms(
                    height, width, harmonic * ux, harmonic * uy, 0.0, colour / harmonic
                )
        else:
            vx, vy = -uy, ux
            for hu in (1, 3):
                for hv in (1, 3):  # cos(u) cos(v) = (cos(u + v) + cos(u - v)) / 2
                    weight = colour / (2.0 * hu * hv)
                    for sign in (1.0, -1.0):
                        kx, ky = hu * ux + sign * hv * vx, hu * uy + sign * hv * vy
                        terms += _wave_terms(height, width, kx, ky, 0.0, weight)
    sigma = np.float32(rng.uniform(3.0, 15.0))
    columns = np.stack([column for column, _ in terms], axis=1)
    rows = np.stack([row.reshape(-1) for _, row in terms], axis=0).astype(np.float32)
    # In place throughout: full-size temporaries cost more than the arithmetic.
    image = _small_matmuls(columns, rows / sigma)  # (H, W*3), smooth part in units of sigma
    image += _standard_normals(rng, image.size).reshape(image.shape)
    image *= sigma
    np.clip(image, 0.0, 255.0, out=image)
    return image.astype(np.uint8).reshape(height, width, 3)


def _propose_geometry(
    rng: np.random.Generator, kind: str, height: int, width: int, placed: Sequence[_Geometry]
) -> _Geometry:
    """A random shape of `kind`, diameter SIZE_RANGE of the short side, anywhere in the image
    or (probability P_NEIGHBOUR) overlapping or touching one of `placed`."""
    semi = 0.5 * rng.uniform(*SIZE_RANGE) * min(height, width)
    angle = rng.uniform(0.0, math.pi)
    inner = 0.0
    vertices: tuple[tuple[float, float], ...] = ()
    if kind == "ellipse":
        a, b = semi, semi * rng.uniform(0.35, 1.0)
    elif kind == "rectangle":
        a, b = semi, semi * rng.uniform(0.3, 1.0)
    elif kind == "ring":  # at least 5 px minor semi-axis so that hole and band are visible
        b = max(semi * rng.uniform(0.6, 1.0), 5.0)
        a, inner = max(semi, b), rng.uniform(0.4, 0.7)
    elif kind == "polygon":
        count = int(rng.integers(3, 9))
        steps = np.arange(count) + rng.uniform(-0.3, 0.3, size=count)
        turns = angle + steps * (2.0 * math.pi / count)
        convex = rng.random() < 0.5
        radii = semi * (np.ones(count) if convex else rng.uniform(0.4, 1.0, size=count))
        vertices = tuple(
            (float(r * math.cos(t)), float(r * math.sin(t))) for r, t in zip(radii, turns)
        )
        a = b = semi
    else:
        raise ValueError(f"unknown kind {kind!r}, expected one of {KINDS}")
    radius = 0.5 * (a + b)
    if placed and rng.random() < P_NEIGHBOUR:
        other = placed[int(rng.integers(len(placed)))]
        distance = (other.radius + radius) * rng.uniform(0.3, 1.05)
        heading = rng.uniform(0.0, 2.0 * math.pi)
        cy = other.cy + distance * math.sin(heading)
        cx = other.cx + distance * math.cos(heading)
    else:
        cy, cx = rng.uniform(0.0, height), rng.uniform(0.0, width)
    return _Geometry(kind, cy, cx, a, b, angle, radius, inner, vertices)


def _rasterise(geometry: _Geometry, height: int, width: int) -> tuple[int, int, np.ndarray] | None:
    """The pixels a shape covers inside an HxW image, on its bounding-box crop.

    Returns (y0, x0, mask) where mask is an (h, w) bool array for rows y0..y0+h-1 and columns
    x0..x0+w-1, or None when the shape lies wholly outside the image.
    """
    g = geometry
    cos, sin = math.cos(g.angle), math.sin(g.angle)
    if g.kind == "polygon":
        extent_x = max(abs(vx) for vx, _ in g.vertices)
        extent_y = max(abs(vy) for _, vy in g.vertices)
    elif g.kind == "rectangle":
        extent_x = abs(g.a * cos) + abs(g.b * sin)
        extent_y = abs(g.a * sin) + abs(g.b * cos)
    else:
        extent_x = math.hypot(g.a * cos, g.b * sin)
        extent_y = math.hypot(g.a * sin, g.b * cos)
    x0, x1 = max(0, math.floor(g.cx - extent_x)), min(width, math.ceil(g.cx + extent_x) + 1)
    y0, y1 = max(0, math.floor(g.cy - extent_y)), min(height, math.ceil(g.cy + extent_y) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    if g.kind == "polygon":
        canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
        points = [(g.cx + vx - x0, g.cy + vy - y0) for vx, vy in g.vertices]
        ImageDraw.Draw(canvas).polygon(points, fill=1)
        return y0, x0, np.asarray(canvas).astype(bool)
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(g.cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(g.cy))[:, None]
    u = dx * np.float32(cos) + dy * np.float32(sin)
    v = dy * np.float32(cos) - dx * np.float32(sin)
    if g.kind == "rectangle":
        return y0, x0, (np.abs(u) <= g.a) & (np.abs(v) <= g.b)
    q = (u / np.float32(g.a)) ** 2 + (v / np.float32(g.b)) ** 2
    if g.kind == "ring":
        return y0, x0, (q <= 1.0) & (q > g.inner**2)
    return y0, x0, q <= 1.0


def _choose_colour(rng: np.random.Generator, beneath: np.ndarray) -> np.ndarray:
    """An RGB fill colour, (3,) float64 in [0, 255], usually far from `beneath` (3,).

    With probability P_LOW_CONTRAST it lies 10-35 away from `beneath` instead.
    """
    if rng.random() < P_LOW_CONTRAST:
        return np.clip(beneath + _random_direction(rng, rng.uniform(10.0, 35.0)), 0.0, 255.0)
    candidates = rng.uniform(0.0, 255.0, size=(4, 3))
    distances = np.linalg.norm(candidates - beneath, axis=1)
    return candidates[int(np.argmax(distances))]


@dataclass(frozen=True)
class Pixels:
    """An object's n pixels as offsets from its centre, which textures are drawn around.

    Arguments:
      dy, dx (np.ndarray): (n,) float32 offsets, down and right.
      radius (float): the object's radius in pixels (sets a pattern's scale).
    """

    dy: np.ndarray
    dx: np.ndarray
    radius: float

    @classmethod
    def of(cls, mask: np.ndarray, top: float, left: float, radius: float) -> Pixels:
        """The True pixels of an hxw bool ``mask`` whose top-left pixel lies ``top`` below
        and ``left`` right of the object's centre (both negative inside it)."""
        ys, xs = np.nonzero(mask)
        dy = ys.astype(np.float32) + np.float32(top)
        return cls(dy, xs.astype(np.float32) + np.float32(left), radius)


def _fill(rng: np.random.Generator, texture: str, colour: np.ndarray, pixels: Pixels) -> np.ndarray:
    """The fill of an object's n ``pixels``: (n, 3) uint8.

    flat: exactly `colour` (rounded); gradient: a linear ramp through `colour`; stripes: two
    alternating colours; noise: `colour` plus Gaussian noise.
    """
    dy, dx, radius = pixels.dy, pixels.dx, pixels.radius
    base = np.round(colour).astype(np.float32)
    if texture == "flat":
        return np.broadcast_to(base.astype(np.uint8), (dy.size, 3))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    along = dx * np.float32(math.cos(angle)) + dy * np.float32(math.sin(angle))
    if texture == "gradient":
        delta = _random_direction(rng, rng.uniform(40.0, 110.0))
        t = np.clip(along / np.float32(max(radius, 1.0)), -1.0, 1.0)
        values = base + t[:, None] * (0.5 * delta)
    elif texture == "stripes":
        other = np.clip(base + _random_direction(rng, rng.uniform(40.0, 100.0)), 0.0, 255.0)
        band = (np.floor(along / np.float32(0.5 * rng.uniform(4.0, 16.0))) % 2).astype(bool)
        values = np.where(band[:, None], other, base)
    elif texture == "noise":
        sigma = np.float32(rng.uniform(6.0, 25.0))
        values = base + sigma * _standard_normals(rng, dy.size * 3).reshape(dy.size, 3)
    else:
        raise ValueError(f"unknown texture {texture!r}, expected one of {TEXTURES}")
    return (np.clip(values, 0.0, 255.0) + 0.5).astype(np.uint8)


def min_area(height: int, width: int) -> int:
    """Smallest visible area (pixels) an instance may have in an HxW image."""
    return max(MIN_AREA_PIXELS, math.ceil(MIN_AREA_FRACTION * height * width))


class Instances:
    """The label map of a scene being drawn, and each instance's visible area.

    Arguments:
      height, width (int): the scene's size.
      smallest (int): the fewest visible pixels an instance may have.
    """

    def __init__(self, height: int, width: int, smallest: int) -> None:
        self.labels = np.zeros((height, width), dtype=np.uint8)  # 0 background, k instance k - 1
        self.areas = np.zeros(0, dtype=np.int64)
        self.smallest = smallest

    def __len__(self) -> int:
        return len(self.areas)

    def window(self, placed: tuple[int, int, np.ndarray] | None) -> tuple[slice, slice] | None:
        """Where ``placed``, an hxw bool mask with its top-left at (y0, x0) as
        ``(y0, x0, mask)``, would go; None for no placement, or when the mask is smaller than
        ``smallest`` or would leave an instance already drawn fewer visible pixels than that
        (it is then proposed elsewhere, never dropped later).
        """
        if placed is None:
            return None
        y0, x0, mask = placed
        if int(np.count_nonzero(mask)) < self.smallest:
            return None
        window = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        if np.any(self.areas - self._covered(window, mask) < self.smallest):
            return None
        return window

    def add(self, window: tuple[slice, slice], mask: np.ndarray) -> None:
        """Label ``mask`` at ``window`` (from :meth:`window`) as the next instance."""
        covered = self._covered(window, mask)
        self.labels[window][mask] = len(self.areas) + 1
        self.areas = np.append(self.areas - covered, int(np.count_nonzero(mask)))

    def masks(self) -> np.ndarray:
        """NxHxW bool, one mask per instance, in the order drawn."""
        ids = np.arange(1, len(self.areas) + 1, dtype=np.uint8)
        return self.labels[None, :, :] == ids[:, None, None]

    def _covered(self, window: tuple[slice, slice], mask: np.ndarray) -> np.ndarray:
        """Pixels of each instance so far that ``mask`` at ``window`` would cover."""
        return np.bincount(self.labels[window][mask], minlength=len(self.areas) + 1)[1:]


def _generate(
    rng: np.random.Generator, height: int, width: int, max_objects: int
) -> tuple[Sample, tuple[_Placed, ...]]:
    """make_sample, also returning how each instance was drawn (same order as the masks).

    Objects are drawn one by one onto the background; an object is redrawn elsewhere (a new
    random proposal) when its own area is below min_area or when it would cover so much of an
    earlier object that that one's visible area drops below min_area. So no instance is ever
    dropped after the fact and no unlabelled sliver of an object stays in the image.
    """
    if height < MIN_SIDE or width < MIN_SIDE:
        raise ValueError(f"image must be at least {MIN_SIDE}x{MIN_SIDE}, got {height}x{width}")
    if not 1 <= max_objects <= 255:
        raise ValueError(f"max_objects must be in 1..255, got {max_objects}")
    target = int(rng.integers(1, max_objects + 1))
    image = _background(rng, height, width)
    instances = Instances(height, width, min_area(height, width))
    placed: list[_Placed] = []
    for attempt in range(_MAX_ATTEMPTS):
        if len(placed) == target or (placed and attempt >= 8 * target + 20):
            break
        kind = KINDS[int(rng.integers(len(KINDS)))]
        geometry = _propose_geometry(rng, kind, height, width, [p.geometry for p in placed])
        raster = _rasterise(geometry, height, width)
        window = instances.window(raster)
        if window is None:
            continue
        y0, x0, mask = raster
        image_crop = image[window]
        beneath = image_crop[::3, ::3].reshape(-1, 3).mean(axis=0)
        colour = _choose_colour(rng, beneath)
        texture = TEXTURES[int(rng.choice(len(TEXTURES), p=[0.4, 0.25, 0.15, 0.2]))]
        pixels = Pixels.of(mask, y0 - geometry.cy, x0 - geometry.cx, geometry.radius)
        image_crop[mask] = _fill(rng, texture, colour, pixels)
        instances.add(window, mask)
        rgb = tuple(int(c) for c in np.round(colour))
        placed.append(_Placed(geometry, texture, (rgb[0], rgb[1], rgb[2])))
    if not placed:
        raise RuntimeError(f"could not place any object in {height}x{width}")
    kinds = tuple(p.geometry.kind for p in placed)
    return Sample(image=image, masks=instances.masks(), kinds=kinds), tuple(placed)


def make_sample(rng: np.random.Generator, height: int, width: int, max_objects: int = 6) -> Sample:
    """One HxW sample with 1..max_objects instances, drawn from (and advancing) `rng`."""
    return _generate(rng, height, width, max_objects)[0]


def sample_size(rng: np.random.Generator, long_side: tuple[int, int]) -> tuple[int, int]:
    """A random (height, width): the long side uniform in the inclusive range `long_side`,
    the aspect ratio log-uniform between 1:1 and 2:1, in either orientation."""
    low, high = long_side
    if not MIN_SIDE * 2 <= low <= high:
        raise ValueError(f"long_side must satisfy {2 * MIN_SIDE} <= low <= high, got {long_side}")
    long = int(rng.integers(low, high + 1))
    short = min(long, max(math.ceil(long / 2), round(long / 2.0 ** rng.uniform(0.0, 1.0))))
    return (long, short) if rng.random() < 0.5 else (short, long)


def dataset(
    seed: int, count: int, long_side: tuple[int, int] = (256, 256), max_objects: int = 6
) -> Iterator[Sample]:
    """`count` samples; sample i comes from np.random.default_rng([seed, i]) alone.

    The same (seed, i) always gives a byte-identical sample whatever `count` is. Training must
    never use HELDOUT_SEED (the held-out evaluation set); see the module docstring.
    """
    if count < 0 or seed < 0:
        raise ValueError(f"need seed >= 0 and count >= 0, got seed={seed} count={count}")
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        height, width = sample_size(rng, long_side)
        yield make_sample(rng, height, width, max_objects)


def outline_preview(samples: Sequence[Sample], columns: int) -> np.ndarray:
    """A grid of samples with each instance's mask boundary drawn in a bright colour.

    Cells are as large as the largest sample; returns an RGB uint8 image (for eyeballing).
    """
    palette = np.array(
        [(255, 0, 0), (0, 255, 0), (0, 90, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)],
        dtype=np.uint8,
    )
    cell_h = max(s.image.shape[0] for s in samples) + 4
    cell_w = max(s.image.shape[1] for s in samples) + 4
    rows = math.ceil(len(samples) / columns)
    grid = np.full((rows * cell_h, columns * cell_w, 3), 255, dtype=np.uint8)
    for index, sample in enumerate(samples):
        picture = sample.image.copy()
        for k, mask in enumerate(sample.masks):
            inner = mask.copy()
            inner[1:, :] &= mask[:-1, :]
            inner[:-1, :] &= mask[1:, :]
            inner[:, 1:] &= mask[:, :-1]
            inner[:, :-1] &= mask[:, 1:]
            picture[mask & ~inner] = palette[k % len(palette)]
        top, left = (index // columns) * cell_h, (index % columns) * cell_w
        grid[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    return grid


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "/tmp/synthetic_grid.png"
    preview = outline_preview(list(dataset(TRAIN_SEED, 12, long_side=(200, 320))), columns=4)
    Image.fromarray(preview).save(target)
    print(f"wrote {target}")
