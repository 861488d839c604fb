"""Scenes of the synthetic suite: what is in an image (sampling) and how it looks (rendering with Pillow).

An image is a `grid` x `grid` grid of 16-pixel cells (default 2 x 2 -> 32 x 32 pixels), so that with a patch size
of 16 every image token sees exactly one cell. A cell holds at most one item: a shape (circle, square, triangle,
cross) of a fixed size (small 8 px, large 12 px) and a palette colour, an uppercase letter, or a real handwritten
digit from scikit-learn's bundled `load_digits` (8 x 8, upscaled to 14 x 14). Items get a small position and
colour jitter. A scene has one style (its "domain"): filled, outline, striped (outline and diagonal stripes) or noisy
(filled, with Gaussian pixel noise over the whole image); letters and digits are always drawn solid.

A `Scene` is plain data (JSON round trip via to_dict / from_dict) holding every random choice, jitter and noise
seed included, so `render(scene)` is a pure function and every answer can be re-derived from the scene alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features

CELL = 16
PALETTE = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 100, 255), "yellow": (240, 220, 40),
           "purple": (170, 70, 230), "white": (240, 240, 240)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
STYLES = ("filled", "outline", "striped", "noisy")
SIZE_PX = {"small": 8, "large": 12}
# A mild, fixed skew, so that some objects are more frequent than others (POPE's "popular" negatives need it).
COLOUR_WEIGHTS = (0.24, 0.20, 0.18, 0.15, 0.12, 0.11)
SHAPE_WEIGHTS = (0.33, 0.27, 0.22, 0.18)
CORE_STYLE_WEIGHTS = (0.7, 0.1, 0.1, 0.1)  # filled mostly: the style is a nuisance for the core tasks
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VOWELS = "AEIOU"
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen")
# Short words, none an article or a number word (the VQA normalisation rewrites those); longer ones need a 3x3 grid.
WORDS = ("UP", "GO", "OX", "CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "PEN", "MAP", "KEY", "BUS", "CAR", "EGG",
         "FOX", "OWL", "BEE", "ICE", "JAM", "TREE", "FISH", "BIRD", "STAR", "MOON", "LAMP", "BOAT", "DOOR", "RAIN",
         "SNOW", "LEAF", "MILK", "CAKE", "KITE", "FROG", "GOAT", "BEAR", "LION", "WOLF", "DUCK", "ROSE", "SHIP",
         "APPLE", "HOUSE", "TRAIN", "CLOUD", "HORSE", "PLANT", "GARDEN", "ORANGE", "PENCIL", "WINDOW")
DIGITS_HELDOUT_START = 1437  # load_digits samples [1437, 1797) are held out for the MNIST-analogue evaluation
# Fallback 5x7 bitmap font (rows as 5-bit numbers, 2 hex digits per row) for Pillow builds without FreeType.
_BITMAP = dict(zip(LETTERS, (
    "0E11111F111111", "1E11111E11111E", "0E11101010110E", "1E11111111111E", "1F10101E10101F", "1F10101E101010",
    "0E11101711110F", "1111111F111111", "0E04040404040E", "0702020202120C", "11121418141211", "1010101010101F",
    "111B1515111111", "11111915131111", "0E11111111110E", "1E11111E101010", "0E11111115120D", "1E11111E141211",
    "0F10100E01011E", "1F040404040404", "1111111111110E", "11111111110A04", "1111111515150A", "11110A040A1111",
    "1111110A040404", "1F01020408101F"), strict=True))


def fitting_words(grid: int) -> list[str]:
    """The words that fit a grid, one letter per cell."""
    return [word for word in WORDS if len(word) <= grid * grid]


def positions(grid: int) -> list[str]:
    """Cell names in row-major order: top-left, top-right, bottom-left, bottom-right for a 2x2 grid; a 3x3 grid
    adds top-center, middle-left, center, middle-right, bottom-center."""
    rows = ["top", "bottom"] if grid == 2 else ["top", "middle", "bottom"] if grid == 3 else None
    cols = ["left", "right"] if grid == 2 else ["left", "center", "right"]
    if rows is None:
        raise ValueError(f"grid must be 2 or 3, got {grid}")
    return ["center" if (r, c) == ("middle", "center") else f"{r}-{c}" for r in rows for c in cols]


@dataclass
class Item:
    kind: str  # "shape", "letter" or "digit"
    label: str  # the shape name, the letter, or the digit ("7")
    colour: str
    row: int
    col: int
    size: str = "large"  # shapes: small or large; letters and digits are always large
    dx: int = 0  # position jitter in pixels
    dy: int = 0
    rgb: tuple[int, int, int] = (0, 0, 0)  # the jittered palette colour actually drawn
    digit_index: int | None = None  # which load_digits sample (digits only)

    def name(self) -> str:
        """'large red circle', 'red digit 7', 'red letter A'."""
        if self.kind == "shape":
            return f"{self.size} {self.colour} {self.label}"
        return f"{self.colour} {self.kind} {self.label}"


@dataclass
class Scene:
    grid: int
    style: str
    background: tuple[int, int, int]
    items: list[Item] = field(default_factory=list)
    noise_seed: int | None = None

    def position(self, item: Item) -> str:
        return positions(self.grid)[item.row * self.grid + item.col]

    def ordered(self) -> list[Item]:
        return sorted(self.items, key=lambda item: (item.row, item.col))

    def shapes(self) -> list[Item]:
        return [item for item in self.ordered() if item.kind == "shape"]

    def at(self, position: str) -> Item | None:
        return next((item for item in self.items if self.position(item) == position), None)

    def has(self, colour: str, shape: str) -> bool:
        return any(i.kind == "shape" and (i.colour, i.label) == (colour, shape) for i in self.items)

    def describe(self) -> str:
        """'large red circle top-left . small blue square bottom-right . style filled .'"""
        parts = [f"{item.name()} {self.position(item)}" for item in self.ordered()]
        return " . ".join([*parts, f"style {self.style}"]) + " ."

    def word(self) -> str:
        """The letters read in row-major order."""
        return "".join(item.label for item in self.ordered() if item.kind == "letter")

    def to_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "style": self.style, "background": list(self.background),
                "items": [{**vars(item), "rgb": list(item.rgb)} for item in self.items], "noise_seed": self.noise_seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        items = [Item(**{**item, "rgb": tuple(item["rgb"])}) for item in data["items"]]
        return cls(data["grid"], data["style"], tuple(data["background"]), items, data.get("noise_seed"))


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


@lru_cache(maxsize=2)
def digit_indices(part: str) -> dict[int, list[int]]:
    """digit -> load_digits sample indices of the "train" or "heldout" part."""
    _, targets = _digits()
    span = range(DIGITS_HELDOUT_START) if part == "train" else range(DIGITS_HELDOUT_START, len(targets))
    by_digit: dict[int, list[int]] = {d: [] for d in range(10)}
    for index in span:
        by_digit[int(targets[index])].append(index)
    return by_digit


def weighted_sample(rng: random.Random, population: tuple[str, ...], weights: tuple[float, ...] | None,
                    k: int) -> list[str]:
    """k distinct elements, drawn one after another with the given weights."""
    pool, w = list(population), list(weights or [1.0] * len(population))
    chosen = []
    for _ in range(k):
        index = rng.choices(range(len(pool)), weights=w)[0]
        chosen.append(pool.pop(index))
        w.pop(index)
    return chosen


class Sampler:
    """Draws scenes for one grid size from one random stream."""

    def __init__(self, rng: random.Random, grid: int = 2, max_items: int = 4) -> None:
        self.rng, self.grid, self.max_items = rng, grid, min(max_items, grid * grid)

    def _scene(self, style: str) -> Scene:
        background = tuple(self.rng.randint(0, 24) for _ in range(3))
        noise_seed = self.rng.getrandbits(32) if style == "noisy" else None
        return Scene(self.grid, style, background, [], noise_seed)

    def _cells(self, n: int) -> list[tuple[int, int]]:
        return [divmod(cell, self.grid) for cell in self.rng.sample(range(self.grid * self.grid), n)]

    def _item(self, kind: str, label: str, colour: str, cell: tuple[int, int], size: str = "large",
              digit_index: int | None = None) -> Item:
        jitter = 1 if kind != "shape" or size == "large" else 2
        rgb = tuple(min(255, max(0, v + self.rng.randint(-12, 12))) for v in PALETTE[colour])
        return Item(kind, label, colour, cell[0], cell[1], size, self.rng.randint(-jitter, jitter),
                    self.rng.randint(-jitter, jitter), rgb, digit_index)

    def style(self, styles: tuple[str, ...] = STYLES, weights: tuple[float, ...] | None = None) -> str:
        return self.rng.choices(styles, weights=weights)[0]

    def count(self, low: int = 1, high: int | None = None) -> int:
        return self.rng.randint(low, min(high or self.max_items, self.max_items))

    def shapes(self, n: int, style: str, unique: bool = True, colours: tuple[str, ...] = COLOURS,
               shapes: tuple[str, ...] = SHAPES) -> Scene:
        """n shapes in distinct cells; unique: no two share a colour or a shape (so "the red object" and "the
        circle" name one item). Otherwise colours and shapes come from `colours` and `shapes`, repeats allowed."""
        scene = self._scene(style)
        weights = tuple(COLOUR_WEIGHTS[COLOURS.index(c)] for c in colours)
        shape_weights = tuple(SHAPE_WEIGHTS[SHAPES.index(s)] for s in shapes)
        if unique:
            chosen_colours = weighted_sample(self.rng, colours, weights, n)
            chosen_shapes = weighted_sample(self.rng, shapes, shape_weights, n)
        else:
            chosen_colours = self.rng.choices(colours, weights=weights, k=n)
            chosen_shapes = self.rng.choices(shapes, weights=shape_weights, k=n)
        for colour, shape, cell in zip(chosen_colours, chosen_shapes, self._cells(n), strict=True):
            scene.items.append(self._item("shape", shape, colour, cell, self.rng.choice(SIZES)))
        return scene

    def one(self, style: str, shape: str | None = None, size: str | None = None, colour: str | None = None) -> Scene:
        """A single shape; attributes not given are drawn."""
        scene = self._scene(style)
        shape = shape or self.rng.choices(SHAPES, weights=SHAPE_WEIGHTS)[0]
        colour = colour or self.rng.choices(COLOURS, weights=COLOUR_WEIGHTS)[0]
        scene.items.append(self._item("shape", shape, colour, self._cells(1)[0], size or self.rng.choice(SIZES)))
        return scene

    def digits(self, n: int, part: str = "train", colours: tuple[str, ...] = COLOURS, style: str = "filled",
               distinct: bool = False) -> Scene:
        scene = self._scene(style)
        pool = digit_indices(part)
        values = self.rng.sample(range(10), n) if distinct else [self.rng.randrange(10) for _ in range(n)]
        for value, cell in zip(values, self._cells(n), strict=True):
            scene.items.append(self._item("digit", str(value), self.rng.choice(colours), cell,
                                          digit_index=self.rng.choice(pool[value])))
        return scene

    def letters(self, text: str, style: str = "filled", colour: str | None = None, in_order: bool = True) -> Scene:
        """`text` one letter per cell: from the top-left in reading order (a word), or in random cells."""
        scene = self._scene(style)
        cells = [divmod(i, self.grid) for i in range(len(text))] if in_order else self._cells(len(text))
        for letter, cell in zip(text, cells, strict=True):
            scene.items.append(self._item("letter", letter, colour or self.rng.choice(COLOURS), cell))
        return scene

    def word(self, style: str = "filled") -> Scene:
        return self.letters(self.rng.choice(fitting_words(self.grid)), style, self.rng.choice(COLOURS))

    def mixed(self, style: str) -> Scene:
        """Shapes with one digit or letter among them (pretraining)."""
        n = self.count(2)
        scene = self.shapes(n - 1, style, unique=False)
        free = [(r, c) for r in range(self.grid) for c in range(self.grid)
                if not any((i.row, i.col) == (r, c) for i in scene.items)]
        cell = self.rng.choice(free)
        if self.rng.random() < 0.5:
            value = self.rng.randrange(10)
            scene.items.append(self._item("digit", str(value), self.rng.choice(COLOURS), cell,
                                          digit_index=self.rng.choice(digit_indices("train")[value])))
        else:
            scene.items.append(self._item("letter", self.rng.choice(LETTERS), self.rng.choice(COLOURS), cell))
        return scene


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def font_kind(requested: str = "auto") -> str:
    """"freetype" (Pillow's bundled default font, when Pillow has FreeType) or "bitmap" (the built-in 5x7 font)."""
    if requested not in ("auto", "freetype", "bitmap"):
        raise ValueError(f"font must be auto, freetype or bitmap, got {requested!r}")
    if requested == "auto":
        return "freetype" if features.check("freetype2") else "bitmap"
    return requested


@lru_cache(maxsize=64)
def _glyph(letter: str, font: str) -> Image.Image:
    """A bold mask of `letter`: at most 13 x 13 pixels (FreeType), or 10 x 14 (the bitmap font)."""
    if font == "bitmap":
        rows = [int(_BITMAP[letter][i:i + 2], 16) for i in range(0, 14, 2)]
        mask = Image.new("L", (5, 7), 0)
        mask.putdata([255 if row >> (4 - x) & 1 else 0 for row in rows for x in range(5)])
        return mask.resize((10, 14), Image.NEAREST)
    big = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(big).text((32, 32), letter, font=ImageFont.load_default(size=48), fill=255, anchor="mm",
                             stroke_width=2, stroke_fill=255)
    big = big.crop(big.getbbox())
    scale = 13 / max(big.size)
    return big.resize((max(1, round(big.width * scale)), max(1, round(big.height * scale))), Image.BOX)


def _shape_mask(item: Item, size: int) -> Image.Image:
    """A full-image mask of one shape in its cell (before the style is applied)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    s = SIZE_PX[item.size]
    left = item.col * CELL + (CELL - s) // 2 + item.dx
    top = item.row * CELL + (CELL - s) // 2 + item.dy
    right, bottom = left + s - 1, top + s - 1
    if item.label == "circle":
        draw.ellipse((left, top, right, bottom), fill=255)
    elif item.label == "square":
        draw.rectangle((left, top, right, bottom), fill=255)
    elif item.label == "triangle":
        draw.polygon([(left + (s - 1) / 2, top), (left, bottom), (right, bottom)], fill=255)
    elif item.label == "cross":
        t = s // 3 + (s % 3 > 0)  # bar thickness: 3 px small, 4 px large
        a = left + (s - t) // 2
        b = top + (s - t) // 2
        draw.rectangle((left, b, right, b + t - 1), fill=255)
        draw.rectangle((a, top, a + t - 1, bottom), fill=255)
    else:
        raise ValueError(f"unknown shape {item.label!r}")
    return mask


def _styled(mask: Image.Image, item: Item, style: str) -> Image.Image:
    if style == "filled" or style == "noisy":
        return mask
    pixels = np.asarray(mask)
    width = 1 if item.size == "small" or style == "striped" else 2
    inside = np.asarray(mask.filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    keep = ~inside  # outline: the border only; striped: the border and diagonal stripes inside
    if style == "striped":
        ys, xs = np.indices(pixels.shape)
        keep |= (xs + ys) % 4 < 2
    return Image.fromarray(np.where(keep, pixels, 0).astype(np.uint8))


def _item_mask(item: Item, size: int, style: str, font: str) -> Image.Image:
    if item.kind == "shape":
        return _styled(_shape_mask(item, size), item, style)
    if item.kind == "digit":
        images, _ = _digits()
        small = Image.fromarray((images[item.digit_index] * (255 / 16)).round().astype(np.uint8))
        glyph = small.resize((14, 14), Image.BILINEAR)
    else:
        glyph = _glyph(item.label, font)
    mask = Image.new("L", (size, size), 0)
    left = item.col * CELL + (CELL - glyph.width) // 2 + item.dx
    top = item.row * CELL + (CELL - glyph.height) // 2 + item.dy
    mask.paste(glyph, (left, top))
    return mask


def render(scene: Scene, font: str = "freetype") -> Image.Image:
    """The RGB image of a scene (deterministic: every random choice is in the scene)."""
    size = scene.grid * CELL
    image = Image.new("RGB", (size, size), scene.background)
    for item in scene.items:
        image.paste(Image.new("RGB", (size, size), item.rgb), (0, 0), _item_mask(item, size, scene.style, font))
    if scene.style == "noisy":
        noise = np.random.default_rng(scene.noise_seed).normal(0.0, 28.0, (size, size, 3))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).round().astype(np.uint8))
    return image
