"""The toy world: procedural images with plain-English captions, and an analytic detector of them.

A scene is a few flat-coloured shapes on a flat background:

    "two small red circles on a black background"
    "a large blue triangle at the top on a white background"

Attributes: shape (circle, square, triangle), colour (six), size (small, large; three objects are
always small), count (one to three), background (black, white, gray) and, for a single shape, its position (center, left,
right, top, bottom). Everything is a function of (split, index, seed), so a dataset is reproducible
anywhere. `HELD_OUT` lists (shape, colour) pairs that never appear in training scenes: held-out
captions ask for those combinations, which tests whether a model composes the words it learnt.

The detector reads the attributes back from an RGB image analytically (background = the border's
colour, objects = connected pixels far from it, colour = the nearest palette entry, shape = the ideal
outline of the object's area at its centroid that overlaps it most, size = its area, position = its
centroid). On the
generator's own images it is exact (tested), so its accuracy on a model's samples measures the model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["ATTRIBUTES", "BACKGROUNDS", "COLOURS", "HELD_OUT", "SHAPES", "Scene", "caption", "detect", "render", "scenes",
           "score", "parse", "attributes"]

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
}
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
SIZES = {"small": 5.5, "large": 9.0}  # radius (circle) / half side at 64 px; scaled with the image
POSITIONS = {"center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
             "bottom": (0.5, 0.75)}
COUNTS = {1: "a", 2: "two", 3: "three"}
# (shape, colour) pairs that appear only in held-out captions
HELD_OUT = frozenset({("circle", "green"), ("square", "orange"), ("triangle", "purple"), ("square", "blue")})
ATTRIBUTES = ("shape", "colour", "size", "count", "background", "position")


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    count: int
    background: str
    position: str | None  # only for count == 1
    centres: tuple[tuple[float, float], ...]  # object centres as fractions of the image side


def caption(scene: Scene) -> str:
    noun = scene.shape + ("s" if scene.count > 1 else "")
    where = f" at the {scene.position}" if scene.position and scene.position != "center" else (
        " in the center" if scene.position == "center" else "")
    return f"{COUNTS[scene.count]} {scene.size} {scene.colour} {noun}{where} on a {scene.background} background"


def _scatter(rng: np.random.Generator, count: int, size: str) -> tuple[tuple[float, float], ...]:
    """Centres of `count` non-overlapping objects (fractions of the side), by rejection sampling."""
    radius = SIZES[size] / 64.0
    lo, hi = 1.6 * radius + 0.03, 1 - 1.6 * radius - 0.03  # a triangle reaches 1.57 r sideways
    for _ in range(10000):
        pts = [tuple(rng.uniform(lo, hi, 2)) for _ in range(count)]
        if all(math.dist(a, b) > 3.5 * radius for i, a in enumerate(pts) for b in pts[i + 1:]):
            return tuple((float(x), float(y)) for x, y in pts)
    raise RuntimeError("could not place the objects")  # not reached with these sizes


def sample_scene(rng: np.random.Generator, held_out: bool) -> Scene:
    """One random scene; `held_out` draws its (shape, colour) from HELD_OUT, else from the rest."""
    pairs = sorted(HELD_OUT) if held_out else [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELD_OUT]
    shape, colour = pairs[rng.integers(len(pairs))]
    count = int(rng.integers(1, 4))
    size = ("small", "large")[rng.integers(2)] if count < 3 else "small"  # three large ones do not fit 64 px
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    if count == 1:
        position = list(POSITIONS)[rng.integers(len(POSITIONS))]
        jitter = rng.uniform(-0.04, 0.04, 2)
        centres = ((POSITIONS[position][0] + jitter[0], POSITIONS[position][1] + jitter[1]),)
    else:
        position = None
        centres = _scatter(rng, count, size)
    return Scene(shape, colour, size, count, background, position, tuple((float(x), float(y)) for x, y in centres))


def scenes(split: str, count: int, seed: int = 0) -> list[Scene]:
    """`count` scenes of split "train" (no HELD_OUT pair) or "heldout" (only HELD_OUT pairs), deterministic."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    return [sample_scene(rng, split == "heldout") for _ in range(count)]


def _mask(shape: str, cx: float, cy: float, r: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.886  # same area as the circle of radius r
        return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)
    # an upward isosceles triangle with the circle's area (height 2r, base pi r), centred on its centroid
    h = 2.0 * r
    top, bottom = cy - h * 2 / 3, cy + h / 3
    half = (yy - top) / h * (math.pi * r / 2)  # the half-width grows from 0 at the apex to pi r / 2
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as a uint8 RGB image [size, size, 3]."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    r = SIZES[scene.size] * size / 64.0
    for cx, cy in scene.centres:
        image[_mask(scene.shape, cx * size, cy * size, r, yy, xx)] = COLOURS[scene.colour]
    return image


# ---------------------------------------------------------------------------------------------- detector


def _components(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    return [labels == i for i in range(1, n + 1) if (labels == i).sum() >= min_area]


def detect(image: np.ndarray) -> dict:
    """Attributes read off an RGB image [H, W, 3] (uint8 or float in [0, 255]); None where unreadable."""
    image = np.asarray(image, np.float32)
    size = image.shape[0]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    bg = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda k: np.linalg.norm(bg - BACKGROUNDS[k]))
    far = np.linalg.norm(image - bg, axis=-1) > 60
    scale = (size / 64.0) ** 2
    objects = _components(far, min_area=int(12 * scale))
    out = dict(background=background, count=len(objects), shape=None, colour=None, size=None, position=None)
    if not objects:
        return out
    pixels = image[np.logical_or.reduce(objects)]
    out["colour"] = min(COLOURS, key=lambda k: np.linalg.norm(np.median(pixels, axis=0) - COLOURS[k]))
    votes, areas, centres = [], [], []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for obj in objects:
        ys, xs = np.nonzero(obj)
        area = float(obj.sum())
        areas.append(area / scale)
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        centres.append((cx / size, cy / size))
        # the shape whose ideal outline of the same area, at the same centroid, overlaps the object most
        # (robust to the soft edges and rounded corners a decoder draws)
        r = math.sqrt(area / math.pi)
        ious = {}
        for shape in SHAPES:
            ideal = _mask(shape, cx, cy, r, yy, xx)
            ious[shape] = (ideal & obj).sum() / max((ideal | obj).sum(), 1)
        votes.append(max(ious, key=ious.get))
    out["shape"] = max(SHAPES, key=votes.count)
    small, large = (math.pi * SIZES[k] ** 2 for k in ("small", "large"))
    out["size"] = "small" if np.median(areas) < math.sqrt(small * large) else "large"
    if len(objects) == 1:
        cx, cy = centres[0]
        out["position"] = min(POSITIONS, key=lambda k: math.dist((cx, cy), POSITIONS[k]))
    return out


def attributes(scene: Scene) -> dict:
    return dict(shape=scene.shape, colour=scene.colour, size=scene.size, count=scene.count,
                background=scene.background, position=scene.position)


def parse(text: str) -> dict:
    """The attributes a caption asks for (the inverse of `caption`); ValueError for other text."""
    words = text.split()
    try:
        count = {v: k for k, v in COUNTS.items()}[words[0]]
        size, colour, noun = words[1], words[2], words[3]
        shape = noun[:-1] if count > 1 else noun
        rest = " ".join(words[4:])
        position = None
        if rest.startswith("at the "):
            position, rest = words[6], " ".join(words[7:])
        elif rest.startswith("in the center"):
            position, rest = "center", " ".join(words[7:])
        background = rest.split()[2]  # "on a <background> background"
    except (KeyError, IndexError) as exc:
        raise ValueError(f"not a toy-world caption: {text!r}") from exc
    found = dict(shape=shape, colour=colour, size=size, count=count, background=background, position=position)
    if shape not in SHAPES or colour not in COLOURS or size not in SIZES or background not in BACKGROUNDS:
        raise ValueError(f"not a toy-world caption: {text!r}")
    return found


def score(truth: Scene | dict, found: dict) -> dict[str, bool]:
    """Per attribute: does the detection match (position only for single objects)."""
    truth = attributes(truth) if isinstance(truth, Scene) else truth
    return {k: found[k] == truth[k] for k in ATTRIBUTES if not (k == "position" and truth["count"] != 1)}
