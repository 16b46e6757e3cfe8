"""The demo model's data: captioned pictures of one shape on a plain background, made in code, and an independent
checker that reads a picture back against its caption.

A scene is a coloured shape in one cell of a 3x3 grid on a background of another colour, captioned
"a red circle at the top left on a blue background". Everything is deterministic from a seed. Nine whole
(colour, position) combinations are held out of training, with every shape and background: training never shows,
say, anything orange at the top left, though it shows orange everywhere else and every other colour there. A
held-out caption is then new in exactly what the checker checks, made of words the model has seen many times.

The checker uses no model: it labels every pixel with the nearest palette colour, then asks whether the named
colour dominates the middle of the named cell, and whether the named background fills the rest of the picture.
This module needs only NumPy (the reference environment loads it too).
"""

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
IMAGE_SIZE = 64

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
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    inside = _coverage(scene.shape, coords[None, :] - cx, coords[:, None] - cy, r)
    alpha = inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
    fg, bg = np.array(COLOURS[scene.colour], np.float64), np.array(COLOURS[scene.background], np.float64)
    return np.round(alpha * fg + (1 - alpha) * bg).astype(np.uint8)


def render_batch(scenes: list[Scene], size: int = IMAGE_SIZE, seed: int | None = None) -> np.ndarray:
    """(B, size, size, 3) uint8; with a seed, each shape's size and place vary (deterministically)."""
    rng = None if seed is None else np.random.default_rng(seed)
    return np.stack([render(s, size, rng) for s in scenes])


# ---------------------------------------------------------------------------------------------------- checking
PALETTE = np.array(list(COLOURS.values()), np.float64)
INNER = 0.5  # the checked middle of a cell, as a fraction of its side
SHAPE_MIN_FRACTION = 0.4  # of the middle of the cell in the named colour
BACKGROUND_MIN_FRACTION = 0.8  # of the pixels outside the named cell in the named background colour


@dataclass
class CheckResult:
    shape_ok: bool
    background_ok: bool
    shape_fraction: float  # of the middle of the named cell in the named colour
    shape_dominant: str  # the commonest colour there
    background_fraction: float  # of the pixels outside the named cell in the background colour
    background_dominant: str

    @property
    def ok(self) -> bool:
        return self.shape_ok and self.background_ok

    def __bool__(self) -> bool:
        return self.ok


def label_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour (Euclidean in RGB)."""
    x = np.asarray(image, np.float64)[..., :3]
    d = ((x[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def check(image, caption: str) -> CheckResult:
    """Does `image` (H, W, 3) uint8 array or PIL image, square, show `caption`? The named colour must be the
    commonest colour in the middle of the named cell and cover at least 40% of it; the named background colour
    must cover at least 80% of everything outside that cell."""
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
    middle = labels[mid_y[:, None] & mid_x[None, :]]
    outside = labels[~cell]

    counts = np.bincount(middle, minlength=len(names))
    shape_fraction = float(counts[names.index(scene.colour)] / middle.size)
    shape_dominant = names[int(counts.argmax())]
    back_counts = np.bincount(outside, minlength=len(names))
    background_fraction = float(back_counts[names.index(scene.background)] / outside.size)
    return CheckResult(
        shape_ok=shape_dominant == scene.colour and shape_fraction >= SHAPE_MIN_FRACTION,
        background_ok=background_fraction >= BACKGROUND_MIN_FRACTION,
        shape_fraction=shape_fraction,
        shape_dominant=shape_dominant,
        background_fraction=background_fraction,
        background_dominant=names[int(back_counts.argmax())],
    )


def score(images, captions) -> float:
    """The fraction of (image, caption) pairs the checker accepts."""
    results = [check(im, c) for im, c in zip(images, captions)]
    return sum(r.ok for r in results) / len(results)
