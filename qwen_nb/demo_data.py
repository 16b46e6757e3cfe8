"""The demo model's data: captioned pictures of one shape on a plain background, made in code, and an independent
checker that reads a picture back against its caption.

A scene is a coloured shape in one cell of a 3x3 grid on a background of another colour, captioned
"a red circle at the top left on a blue background". Everything is deterministic from a seed. Nine whole
(colour, position) combinations are held out of training, with every shape and background: training never shows,
say, anything orange at the top left, though it shows orange everywhere else and every other colour there. A
held-out caption is then new in exactly what the checker checks, made of words the model has seen many times.

The checker uses no model: it labels every pixel with the nearest palette colour, then asks whether the named
colour dominates the middle of the named cell, whether the named background fills the rest of the picture, and
whether the blob of the named colour there has the named shape (how much of its bounding box it fills, how its
area splits between the box's top and bottom halves, and that it fills most of its convex hull: not ragged).
This module needs only NumPy (the reference environment loads it too).
"""

import math
import re
from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 125, 20),
    "yellow": (245, 220, 45),
    "green": (40, 165, 65),
    "blue": (40, 80, 225),
    "purple": (140, 60, 195),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
# (row, column) of each position in the 3x3 grid, and how a caption says it
POSITIONS = {
    "top left": (0, 0),
    "top centre": (0, 1),
    "top right": (0, 2),
    "middle left": (1, 0),
    "centre": (1, 1),
    "middle right": (1, 2),
    "bottom left": (2, 0),
    "bottom centre": (2, 1),
    "bottom right": (2, 2),
}
IMAGE_SIZE = 96  # 3 cells of 2x2 transformer tokens (16 pixels each) a side

_CAPTION = re.compile(
    r"^an? (?P<colour>\w+) (?P<shape>\w+) (?:at the|in the) (?P<position>[\w ]+?) on an? (?P<background>\w+) "
    r"background$"
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    background: str

    def __post_init__(self):
        if self.colour not in COLOURS or self.background not in COLOURS:
            raise ValueError(f"colours must be among {list(COLOURS)}; got {self.colour!r} on {self.background!r}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background are both {self.colour}: nothing would show")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {list(POSITIONS)}, got {self.position!r}")

    @property
    def caption(self) -> str:
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        return f"{_article(self.colour)} {self.colour} {self.shape} {where} on {_article(self.background)} {self.background} background"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.position)

    @classmethod
    def from_caption(cls, caption: str) -> "Scene":
        m = _CAPTION.match(caption.strip())
        if m is None:
            raise ValueError(
                f"not a demo caption: {caption!r}; expected e.g. 'a red circle at the top left on a blue background'"
            )
        return cls(**m.groupdict())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_pairs() -> list[tuple[str, str]]:
    return [(c, p) for c in COLOURS for p in POSITIONS]


def held_out_pairs() -> set[tuple[str, str]]:
    """The (colour, position) combinations never shown in training: one per position, the colours spread so that
    each is held out at one or two positions (8 colours, 9 positions)."""
    colours = list(COLOURS)
    return {(colours[(3 * i + 1) % len(colours)], p) for i, p in enumerate(POSITIONS)}


def backgrounds_for(colour: str) -> list[str]:
    return [b for b in COLOURS if b != colour]


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p, b) for c in COLOURS for s in SHAPES for p in POSITIONS for b in backgrounds_for(c)]


def training_scenes() -> list[Scene]:
    """Every scene (caption) the training set may show: 63 (colour, position) pairs x 4 shapes x 7 backgrounds."""
    held = held_out_pairs()
    return [s for s in all_scenes() if s.pair not in held]


def held_out_scenes() -> list[Scene]:
    held = held_out_pairs()
    return [s for s in all_scenes() if s.pair in held]


def test_scenes(n: int = 16, seed: int = 0) -> list[Scene]:
    """n held-out scenes, distinct in (colour, shape, position), with random backgrounds; fixed for a seed."""
    rng = np.random.default_rng(seed)
    combos = sorted({(c, s, p) for c, p in held_out_pairs() for s in SHAPES})
    if n > len(combos):
        raise ValueError(f"only {len(combos)} held-out (colour, shape, position) combinations; asked for {n}")
    scenes = []
    for i in rng.choice(len(combos), n, replace=False):
        c, s, p = combos[i]
        backs = backgrounds_for(c)
        scenes.append(Scene(c, s, p, backs[rng.integers(len(backs))]))
    return scenes


def validation_scenes(n_test: int = 16, seed: int = 0) -> list[Scene]:
    """The held-out (colour, shape, position) combinations that test_scenes(n_test, seed) does not use, one scene
    each with a random background (fixed): what a training run may select its checkpoint on, so that the test
    captions' score stays a measurement of the chosen model and not part of choosing it."""
    used = {(s.colour, s.shape, s.position) for s in test_scenes(n_test, seed)}
    rng = np.random.default_rng(seed + 1)
    scenes = []
    for c, s, p in sorted({(c, s, p) for c, p in held_out_pairs() for s in SHAPES} - used):
        backs = backgrounds_for(c)
        scenes.append(Scene(c, s, p, backs[rng.integers(len(backs))]))
    return scenes


def sample_scenes(rng: np.random.Generator, n: int, scenes: list[Scene] | None = None) -> list[Scene]:
    scenes = training_scenes() if scenes is None else scenes
    return [scenes[i] for i in rng.integers(len(scenes), size=n)]


# ---------------------------------------------------------------------------------------------------- rendering
SUPERSAMPLE = 4
RADIUS = (0.32, 0.40)  # shape half-size as a fraction of a grid cell, drawn uniformly
JITTER = 1 / 40  # centre offset, at most this fraction of the image side along each axis


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-mask of a shape of half-size r centred at the origin, on offset grids dx, dy (y grows downwards)."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    if shape == "triangle":  # pointing up, a little larger, shifted so its centroid sits on the centre
        r = 1.2 * r
        y = dy + r / 3
        return (y <= r) & (np.abs(dx) <= (y + r) / 2)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as uint8 (size, size, 3), anti-aliased. With rng, the shape's size and centre vary a little;
    without, it is the mid-size shape exactly in the middle of its cell."""
    cell = size / 3
    row, col = POSITIONS[scene.position]
    cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
    r = sum(RADIUS) / 2 * cell
    if rng is not None:
        r = rng.uniform(*RADIUS) * cell
        cx, cy = cx + rng.uniform(-1, 1) * JITTER * size, cy + rng.uniform(-1, 1) * JITTER * size
    reach = 2 * r + 1  # every shape lies within 1.6 r of its centre: coverage is zero beyond
    y0, y1 = max(0, math.floor(cy - reach)), min(size, math.ceil(cy + reach))
    x0, x1 = max(0, math.floor(cx - reach)), min(size, math.ceil(cx + reach))
    sub = (
        (np.arange(SUPERSAMPLE * (y1 - y0)) + 0.5) / SUPERSAMPLE + y0,
        (np.arange(SUPERSAMPLE * (x1 - x0)) + 0.5) / SUPERSAMPLE + x0,
    )
    inside = _coverage(scene.shape, sub[1][None, :] - cx, sub[0][:, None] - cy, r)
    alpha = np.zeros((size, size, 1))
    alpha[y0:y1, x0:x1, 0] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    fg, bg = np.array(COLOURS[scene.colour], np.float64), np.array(COLOURS[scene.background], np.float64)
    return np.round(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


def render_batch(scenes: list[Scene], size: int = IMAGE_SIZE, seed: int | None = None) -> np.ndarray:
    """(B, size, size, 3) uint8; with a seed, each shape's size and place vary (deterministically)."""
    rng = None if seed is None else np.random.default_rng(seed)
    return np.stack([render(s, size, rng) for s in scenes])


# ---------------------------------------------------------------------------------------------------- checking
PALETTE = np.array(list(COLOURS.values()), np.float64)
INNER = 0.5  # the checked middle of a cell, as a fraction of its side
COLOUR_MIN_FRACTION = 0.4  # of the middle of the cell in the named colour
BACKGROUND_MIN_FRACTION = 0.8  # of the pixels outside the named cell in the named background colour
WINDOW = 0.75  # the shape is looked for within this many cell sides of the cell's centre, each way
# (fill, top): the fraction of its bounding box a shape fills, and the share of its area in the box's top half,
# for the ideal shapes: pi/4 for the disc; a triangle pointing up holds a quarter of its area above half height.
SHAPE_FEATURES = {"circle": (np.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.25), "diamond": (0.5, 0.5)}
# All four shapes are convex; drawn on pixels they fill at least 0.87 of their convex hull (0.93 at 96x96). A blob
# that fills less is ragged: no shape, whatever its box says.
SOLIDITY_MIN = 0.8


@dataclass
class CheckResult:
    colour_ok: bool  # the named colour fills the middle of the named cell
    background_ok: bool
    shape_ok: bool  # the named colour's blob there is the named shape
    colour_fraction: float  # of the middle of the named cell in the named colour
    colour_dominant: str  # the commonest colour there
    background_fraction: float  # of the pixels outside the named cell in the background colour
    background_dominant: str
    shape_seen: str | None  # the shape the blob is nearest to, "ragged" when it is no shape; None: no blob
    fill: float  # the blob's share of its bounding box
    top: float  # the share of the blob's area in the top half of its bounding box
    solidity: float  # the blob's share of its convex hull

    @property
    def layout_ok(self) -> bool:
        """Colour, position and background right, whatever the shape."""
        return self.colour_ok and self.background_ok

    @property
    def ok(self) -> bool:
        return self.layout_ok and self.shape_ok

    def __bool__(self) -> bool:
        return self.ok


def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour (Euclidean in RGB)."""
    x = np.asarray(image, np.float64)[..., :3]
    d = ((x[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def largest_component(mask: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of `mask` that touches `seeds` (both (H, W) bool), as a bool mask."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list = []
    for y, x in zip(*np.nonzero(mask & seeds)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, region = [(y, x)], []
        while stack:
            a, b = stack.pop()
            region.append((a, b))
            for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                if 0 <= c < H and 0 <= d < W and mask[c, d] and not seen[c, d]:
                    seen[c, d] = True
                    stack.append((c, d))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, dtype=bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def shape_features(blob: np.ndarray) -> tuple[float, float]:
    """(fill, top) of a bool mask: its share of its bounding box, and the share of its area in the box's top half
    (a row on the middle line counts half)."""
    ys, xs = np.nonzero(blob)
    box = blob[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = box.shape
    rows = box.sum(1).astype(np.float64)
    centre = (np.arange(h) + 0.5) / h
    top = rows[centre < 0.5].sum() + 0.5 * rows[centre == 0.5].sum()
    return float(box.sum() / (h * w)), float(top / rows.sum())


def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (n, 2) points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, np.asarray(points).tolist())))
    if len(pts) < 3:
        return 0.0

    def turn(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and turn(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and turn(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    x, y = np.array(lower[:-1] + upper[:-1], np.float64).T
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def solidity(blob: np.ndarray) -> float:
    """A bool mask's pixel count over the area of the convex hull of its pixels (as unit squares)."""
    ys, xs = np.nonzero(blob)
    corners = np.concatenate([np.c_[xs + dx, ys + dy] for dx in (0, 1) for dy in (0, 1)])
    return float(blob.sum() / convex_hull_area(corners))


def nearest_shape(fill: float, top: float) -> str:
    """The shape whose ideal (fill, top) is nearest."""
    return min(SHAPE_FEATURES, key=lambda s: (fill - SHAPE_FEATURES[s][0]) ** 2 + (top - SHAPE_FEATURES[s][1]) ** 2)


def check(image, caption: str) -> CheckResult:
    """Does `image` (H, W, 3) uint8 array or PIL image, square, show `caption`? Colour and position: the named
    colour must be the commonest colour in the middle of the named cell and cover at least 40% of it. Background:
    the named background colour must cover at least 80% of everything outside that cell. Shape: the connected
    blob of the named colour through the middle of the cell (looked for within 0.75 cell sides of its centre) must
    be nearest the named shape in (fill of its bounding box, share of its area in the box's top half): square
    (1, 0.5), circle (0.785, 0.5), diamond (0.5, 0.5), triangle (0.5, 0.25), and fill at least 80% of its convex
    hull (a ragged blob is no shape)."""
    scene = Scene.from_caption(caption)
    image = np.asarray(image)
    H, W = image.shape[:2]
    labels = label_pixels(image)
    names = list(COLOURS)
    row, col = POSITIONS[scene.position]
    ys, xs = (np.arange(H) + 0.5) / H * 3, (np.arange(W) + 0.5) / W * 3  # grid coordinates of pixel centres
    in_row, in_col = np.floor(ys) == row, np.floor(xs) == col
    cell = in_row[:, None] & in_col[None, :]
    lo, hi = 0.5 - INNER / 2, 0.5 + INNER / 2
    mid_y = in_row & (ys - row >= lo) & (ys - row <= hi)
    mid_x = in_col & (xs - col >= lo) & (xs - col <= hi)
    mid = mid_y[:, None] & mid_x[None, :]
    middle = labels[mid]
    outside = labels[~cell]

    counts = np.bincount(middle, minlength=len(names))
    colour_fraction = float(counts[names.index(scene.colour)] / middle.size)
    colour_dominant = names[int(counts.argmax())]
    back_counts = np.bincount(outside, minlength=len(names))
    background_fraction = float(back_counts[names.index(scene.background)] / outside.size)

    near_y, near_x = np.abs(ys - row - 0.5) <= WINDOW, np.abs(xs - col - 0.5) <= WINDOW
    window = near_y[:, None] & near_x[None, :]
    blob = largest_component((labels == names.index(scene.colour)) & window, mid)
    shape_seen, fill, top, solid = None, 0.0, 0.0, 0.0
    if blob.any():
        fill, top = shape_features(blob)
        solid = solidity(blob)
        shape_seen = nearest_shape(fill, top) if solid >= SOLIDITY_MIN else "ragged"
    return CheckResult(
        colour_ok=colour_dominant == scene.colour and colour_fraction >= COLOUR_MIN_FRACTION,
        background_ok=background_fraction >= BACKGROUND_MIN_FRACTION,
        shape_ok=shape_seen == scene.shape,
        colour_fraction=colour_fraction,
        colour_dominant=colour_dominant,
        background_fraction=background_fraction,
        background_dominant=names[int(back_counts.argmax())],
        shape_seen=shape_seen,
        fill=fill,
        top=top,
        solidity=solid,
    )


def score(images, captions) -> float:
    """The fraction of (image, caption) pairs the checker accepts in everything: colour, position, background and
    shape."""
    results = [check(im, c) for im, c in zip(images, captions)]
    return sum(r.ok for r in results) / len(results)


def scores(images, captions) -> dict[str, int]:
    """How many of the pictures the checker accepts: `layout` (colour, position and background), `shape`, `all`."""
    results = [check(im, c) for im, c in zip(images, captions)]
    return {
        "layout": sum(r.layout_ok for r in results),
        "shape": sum(r.shape_ok for r in results),
        "all": sum(r.ok for r in results),
        "n": len(results),
    }
