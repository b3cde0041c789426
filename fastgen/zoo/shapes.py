"""A procedural text-to-image "shapes world" whose prompts can be checked exactly.

Each image shows 1–2 coloured shapes (3 with ``max_objects=3``) on a plain dark/grey background and
comes with the prompt that describes it completely. The world is kept small on purpose so that tiny
diffusion models can learn it on a CPU; :mod:`fastgen.zoo.evaluate` scores generated images against
their prompts with fixed rules.

World
    * shapes: ``circle``, ``square``, ``triangle`` (upright, isosceles), each fitting a square box of
      10.5–13 px at 32 px (sizes scale with ``size / 32``), never overlapping: boxes are at least 3 px apart
      (scaled) along one axis and 1 px away from the border;
    * colours: ``red``, ``green``, ``blue``, ``yellow`` (well separated in hue; each object's colour is
      jittered by at most ±10 per channel); backgrounds: four neutral tones from near-black to mid-grey
      (chroma 0, brightness jitter ±6), optionally with a faint per-pixel texture (``texture=True``).
    Rendering is crisp (pixel-centre inside tests, no anti-aliasing). Layouts are drawn by rejection
    sampling, so crowded scenes (relations, three objects) lean towards the smaller sizes.

Grammar (fixed; every word is in :data:`VOCAB`)
    * single    (40 %): ``a {colour} {shape}``                            "a red circle"
    * counting  (20 %): ``{two|three} {colour} {shape}s``                  "two blue squares"
    * relation  (40 %): ``a {colour} {shape} {rel} a {colour} {shape}``    "a red triangle left of a blue circle"
      with ``rel`` in ``left of | right of | above | below`` and two different objects.
    "three" only appears with ``max_objects=3`` (then half of the counting prompts use it). A relation
    is rendered with a clear margin: the boxes are separated by >= 3 px (scaled) along the relation's
    axis and the offset across it is at most half the offset along it.

Seeds and held-out convention
    Item ``i`` of ``sample_prompts(n, seed)`` / ``sample(n, seed)`` is drawn from its own stream
    ``numpy.random.default_rng((seed, i))``, so samples are unlimited and ``n`` only truncates: the first
    ``k`` items do not depend on ``n``. **Evaluation uses seeds 0–999** (:data:`EVAL_SEED` = 0 is the
    standard held-out set), **training uses seeds >= 1000** (:data:`TRAIN_SEED_START`); the streams never
    meet. The grammar is finite (552 prompts with two objects at most), so held-out means unseen
    *images* (layouts, sizes, tones, jitter), not unseen prompt strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "COLORS", "SHAPES", "RELATIONS", "NUMBERS", "VOCAB", "PROMPT_MIX", "EVAL_SEED", "TRAIN_SEED_START",
    "ObjectSpec", "PromptSpec", "PlacedObject", "Scene",
    "parse_prompt", "sample_prompts", "layout", "draw", "render", "sample", "all_prompts",
]

#: Object colours (name -> base RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (45, 90, 235),
    "yellow": (235, 205, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three"}
#: Neutral background tones (grey levels, chroma 0).
BACKGROUNDS: tuple[int, ...] = (18, 45, 75, 105)
#: Fraction of each prompt type drawn by :func:`sample_prompts`.
PROMPT_MIX: dict[str, float] = {"single": 0.4, "counting": 0.2, "relation": 0.4}
EVAL_SEED = 0
#: Seed of calibration prompts (``sample_prompts(n, CALIBRATION_SEED)``) for searches that pick a setting
#: (schedules, Skip-Tuning, sCM's 2-step time): never the held-out prompts the evaluator reports on.
CALIBRATION_SEED = 4242
TRAIN_SEED_START = 1000

#: Every word any prompt of the grammar can contain (one token each for a word-level tokenizer).
VOCAB: list[str] = sorted(
    {"a"} | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES} | set(NUMBERS.values())
    | {w for r in RELATIONS for w in r.split()}
)

# Geometry at 32 px (scaled by size / 32).
_MIN_SIZE, _MAX_SIZE = 10.5, 13.0
_GAP = 3.0  # minimum box separation between two objects
_BORDER = 1.0  # minimum distance of a box from the image border
_COLOR_JITTER = 10
_BG_JITTER = 6
_TEXTURE_STD = 3.0

Seed = int | Sequence[int]


@dataclass(frozen=True)
class ObjectSpec:
    """One object named in a prompt."""

    color: str
    shape: str


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its type, the objects it names (repeated for counts) and the relation.

    For relations, ``objects[0] <relation> objects[1]`` holds (e.g. objects[0] is left of objects[1]).
    """

    kind: str  # "single" | "counting" | "relation"
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def prompt(self) -> str:
        """The canonical prompt text (``parse_prompt(spec.prompt) == spec``)."""
        o = self.objects
        if self.kind == "single":
            return f"a {o[0].color} {o[0].shape}"
        if self.kind == "counting":
            return f"{NUMBERS[len(o)]} {o[0].color} {o[0].shape}s"
        return f"a {o[0].color} {o[0].shape} {self.relation} a {o[1].color} {o[1].shape}"


@dataclass(frozen=True)
class PlacedObject:
    """An object as drawn: centre and box side in pixels, RGB colour."""

    color: str
    shape: str
    cx: float
    cy: float
    size: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A fully specified image: what :func:`draw` renders, pixel for pixel."""

    spec: PromptSpec
    size: int
    background: tuple[int, int, int]
    objects: tuple[PlacedObject, ...]
    texture_seed: int | None = None


_GRAMMAR_HELP = (
    "expected 'a {colour} {shape}', '{two|three} {colour} {shape}s' or "
    "'a {colour} {shape} {left of|right of|above|below} a {colour} {shape}' with colour in "
    f"{sorted(COLORS)} and shape in {list(SHAPES)}"
)


def _obj(color: str, shape: str, prompt: str) -> ObjectSpec:
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r} in prompt {prompt!r}; {_GRAMMAR_HELP}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in prompt {prompt!r}; {_GRAMMAR_HELP}")
    return ObjectSpec(color, shape)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the shapes grammar (case, extra spaces and a final '.' are tolerated).

    Raises:
        ValueError: if the prompt is outside the grammar (the message names the expected forms).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    w = prompt.strip().rstrip(".").lower().split()
    numbers = {v: k for k, v in NUMBERS.items()}
    if len(w) == 3 and w[0] == "a":
        return PromptSpec("single", (_obj(w[1], w[2], prompt),))
    if len(w) == 3 and w[0] in numbers:
        if not w[2].endswith("s"):
            raise ValueError(f"counted shape must be plural in {prompt!r}; {_GRAMMAR_HELP}")
        return PromptSpec("counting", (_obj(w[1], w[2][:-1], prompt),) * numbers[w[0]])
    for n_rel in (1, 2):  # "above"/"below" are one word, "left of"/"right of" two
        if len(w) == 6 + n_rel and w[0] == "a" and w[3 + n_rel] == "a":
            rel = " ".join(w[3:3 + n_rel])
            if rel not in RELATIONS:
                raise ValueError(f"unknown relation {rel!r} in {prompt!r}; {_GRAMMAR_HELP}")
            a, b = _obj(w[1], w[2], prompt), _obj(w[-2], w[-1], prompt)
            return PromptSpec("relation", (a, b), rel)
    raise ValueError(f"prompt {prompt!r} is outside the shapes grammar; {_GRAMMAR_HELP}")


def all_prompts(max_objects: int = 2) -> list[str]:
    """Every prompt of the grammar (552 with ``max_objects=2``; relations use two different objects)."""
    objs = [ObjectSpec(c, s) for c in COLORS for s in SHAPES]
    out = [PromptSpec("single", (o,)).prompt for o in objs]
    out += [PromptSpec("counting", (o,) * k).prompt for k in NUMBERS if k <= max_objects for o in objs]
    out += [PromptSpec("relation", (a, b), r).prompt for a in objs for b in objs if a != b for r in RELATIONS]
    return out


def _check_max_objects(max_objects: int) -> None:
    if max_objects not in (2, 3):
        raise ValueError(f"max_objects must be 2 or 3, got {max_objects!r}")


def _draw_spec(rng: np.random.Generator, max_objects: int) -> PromptSpec:
    colors, kinds = list(COLORS), list(PROMPT_MIX)
    kind = kinds[rng.choice(len(kinds), p=list(PROMPT_MIX.values()))]
    a = ObjectSpec(colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))])
    if kind == "single":
        return PromptSpec("single", (a,))
    if kind == "counting":
        k = 2 if max_objects == 2 else int(rng.integers(2, 4))
        return PromptSpec("counting", (a,) * k)
    while True:
        b = ObjectSpec(colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))])
        if b != a:
            break
    return PromptSpec("relation", (a, b), RELATIONS[rng.integers(len(RELATIONS))])


def sample_prompts(n: int, seed: int, max_objects: int = 2) -> list[str]:
    """Draw ``n`` prompts (mix :data:`PROMPT_MIX`); item ``i`` comes from stream ``(seed, i)``.

    Args:
        n: number of prompts.
        seed: evaluation uses 0–999, training >= 1000 (see the module docstring).
        max_objects: 2 (default) or 3 (adds "three ..." counting prompts).
    """
    _check_max_objects(max_objects)
    return [_draw_spec(np.random.default_rng((seed, i)), max_objects).prompt for i in range(int(n))]


def _relation_holds(rel: str | None, a: np.ndarray, b: np.ndarray, gap: float) -> np.ndarray:
    """Whether boxes a (..., 3: cx, cy, side) stand in ``rel`` to boxes b with the rendering margins."""
    if rel is None:
        return np.ones(a.shape[:-1], dtype=bool)
    dx, dy = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]  # a left of b <=> dx > 0; a above b <=> dy > 0
    along, cross = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return (along >= (a[..., 2] + b[..., 2]) / 2 + gap) & (np.abs(cross) <= along / 2)


def _separated(a: np.ndarray, b: np.ndarray, gap: float) -> np.ndarray:
    """Whether boxes a and b (..., 3) are at least ``gap`` apart along one axis."""
    need = (a[..., 2] + b[..., 2]) / 2 + gap
    return (np.abs(a[..., 0] - b[..., 0]) >= need) | (np.abs(a[..., 1] - b[..., 1]) >= need)


def layout(spec: PromptSpec | str, seed: Seed, size: int = 32) -> Scene:
    """Place the objects of a prompt at random (deterministic from ``seed``) so that it holds."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 px, got {size!r}")
    return _layout(spec, np.random.default_rng(seed), int(size), texture=False)


def _layout(spec: PromptSpec, rng: np.random.Generator, size: int, texture: bool) -> Scene:
    k = size / 32.0
    gap, border = _GAP * k, _BORDER * k
    lo, hi = _MIN_SIZE * k, _MAX_SIZE * k
    n = len(spec.objects)
    batch = 64  # candidate layouts drawn at once; the first valid one is taken
    for attempt in range(200):
        top = max(lo, hi - (attempt // 4) * k)  # shrink the largest size if placement keeps failing
        sides = rng.uniform(lo, top, size=(batch, n))
        c = rng.uniform(0.0, 1.0, size=(batch, n, 2)) * (size - 2 * border - sides[..., None]) \
            + border + sides[..., None] / 2
        boxes = np.concatenate([c, sides[..., None]], axis=-1)  # (batch, n, 3)
        ok = np.ones(batch, dtype=bool)
        for i in range(n):
            for j in range(i + 1, n):
                ok &= _separated(boxes[:, i], boxes[:, j], gap)
        if spec.relation is not None:
            ok &= _relation_holds(spec.relation, boxes[:, 0], boxes[:, 1], gap)
        if ok.any():
            chosen = boxes[int(np.argmax(ok))]
            break
    else:  # pragma: no cover - the geometry always fits at >= 16 px
        raise RuntimeError(f"could not lay out {spec.prompt!r} at {size} px")
    objs = []
    for o, (cx, cy, s) in zip(spec.objects, chosen.tolist()):
        rgb = np.clip(np.array(COLORS[o.color]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3), 0, 255)
        objs.append(PlacedObject(o.color, o.shape, cx, cy, s, tuple(int(v) for v in rgb)))
    g = int(np.clip(BACKGROUNDS[rng.integers(len(BACKGROUNDS))] + rng.integers(-_BG_JITTER, _BG_JITTER + 1), 0, 255))
    tex = int(rng.integers(2**31)) if texture else None
    return Scene(spec, size, (g, g, g), tuple(objs), tex)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size image."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[:, None], c[None, :]


def _mask(o: PlacedObject, size: int) -> np.ndarray:
    y, x = _grid(size)
    h = o.size / 2
    if o.shape == "circle":
        return (x - o.cx) ** 2 + (y - o.cy) ** 2 <= h * h
    if o.shape == "square":
        return (np.abs(x - o.cx) <= h) & (np.abs(y - o.cy) <= h)
    if o.shape == "triangle":  # apex at the top centre, base at the bottom of the box
        top = o.cy - h
        return (y <= o.cy + h) & (np.abs(x - o.cx) <= (y - top) / 2)
    raise ValueError(f"unknown shape {o.shape!r}")


def draw(scene: Scene) -> np.ndarray:
    """Rasterise a :class:`Scene` (crisp, no anti-aliasing) to a uint8 array of shape (H, W, 3)."""
    s = scene.size
    img = np.empty((s, s, 3), dtype=np.uint8)
    img[:] = scene.background
    if scene.texture_seed is not None:
        noise = np.random.default_rng(scene.texture_seed).normal(0.0, _TEXTURE_STD, (s, s, 1))
        img = np.clip(img + noise, 0, 255).astype(np.uint8)  # same offset on all channels: stays grey
    for o in scene.objects:
        img[_mask(o, s)] = o.rgb
    return img


def render(prompt_or_scene: str | PromptSpec | Scene, seed: Seed = 0, size: int = 32,
           texture: bool = False) -> np.ndarray:
    """Draw an image that satisfies a prompt; deterministic from ``seed``.

    Args:
        prompt_or_scene: a prompt of the grammar, a parsed :class:`PromptSpec`, or a :class:`Scene`
            (then drawn as is; ``seed``, ``size`` and ``texture`` are ignored).
        seed: an int or a sequence of ints (any ``numpy.random.default_rng`` seed).
        size: image side in pixels (>= 16; 32 is the default world, 64 works too).
        texture: add a faint neutral per-pixel texture to the background.

    Returns:
        uint8 array of shape (size, size, 3).
    """
    if isinstance(prompt_or_scene, Scene):
        return draw(prompt_or_scene)
    spec = parse_prompt(prompt_or_scene) if isinstance(prompt_or_scene, str) else prompt_or_scene
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"render expects a prompt string, PromptSpec or Scene, got {type(spec).__name__}")
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 px, got {size!r}")
    return draw(_layout(spec, np.random.default_rng(seed), int(size), texture))


def sample(n: int, seed: int, size: int = 32, max_objects: int = 2,
           texture: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """Draw ``n`` (image, prompt) pairs; prompts equal ``sample_prompts(n, seed, max_objects)``.

    Image ``i`` is ``render(prompts[i], seed=(seed, i, 1), size=size, texture=texture)``.

    Returns:
        (images, prompts): a list of uint8 (size, size, 3) arrays and the list of their prompts.
    """
    prompts = sample_prompts(n, seed, max_objects)
    images = [render(p, (seed, i, 1), size, texture) for i, p in enumerate(prompts)]
    return images, prompts
