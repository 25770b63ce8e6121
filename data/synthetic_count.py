"""Built-in counting data: N (1..9) non-overlapping shapes on a plain background, format (c).

Shapes are circles, squares and triangles in random colours and sizes. Each shape is placed
by rejection sampling inside its own bounding circle, so two shapes never touch and the
count is unambiguous. Deterministic for a seed (one `random.Random(seed)`).

Output (paths relative to out_dir):

    out_dir/<split>.jsonl   {"messages": [{"role": "user",
                                           "content": "<image>How many shapes are in the image?"}],
                             "images": ["images/<split>_00000.png"], "solution": "3"}
    out_dir/images/<split>_*.png   168x168 px (36 vision tokens for Qwen2.5-VL)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COUNT_QUERY = "How many shapes are in the image?"
GENERATOR_VERSION = 1  # bump when the output for a seed changes: built-in data caches key on it
IMAGE_SIZE = 168  # a multiple of 28 px, Qwen2.5-VL's merged patch size
MIN_COUNT, MAX_COUNT = 1, 9
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Shape:
    kind: str
    cx: float  # centre x, px
    cy: float  # centre y, px
    radius: float  # radius of the bounding circle, px
    rgb: tuple[int, int, int]


def _fits(candidate: Shape, placed: list[Shape], gap: float) -> bool:
    return all(
        math.hypot(candidate.cx - s.cx, candidate.cy - s.cy) >= candidate.radius + s.radius + gap
        for s in placed
    )


def _colour(rng: random.Random) -> tuple[int, int, int]:
    """A saturated colour: one channel dark, one bright, so shapes stand out from the paper."""
    channels = [rng.randint(0, 80), rng.randint(120, 230), rng.randint(0, 230)]
    rng.shuffle(channels)
    return (channels[0], channels[1], channels[2])


def place_shapes(rng: random.Random, count: int, size: int = IMAGE_SIZE) -> list[Shape]:
    """`count` shapes with pairwise gaps >= 4 px; shrinks the radii if the canvas is crowded."""
    max_radius = 20.0
    while True:
        placed: list[Shape] = []
        for _ in range(2000):
            radius = rng.uniform(0.55, 1.0) * max_radius
            shape = Shape(
                kind=rng.choice(SHAPES),
                cx=rng.uniform(radius + 2, size - radius - 2),
                cy=rng.uniform(radius + 2, size - radius - 2),
                radius=radius,
                rgb=_colour(rng),
            )
            if _fits(shape, placed, gap=4.0):
                placed.append(shape)
                if len(placed) == count:
                    return placed
        max_radius *= 0.8  # rare: too crowded for this draw, retry with smaller shapes


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    """Draw one shape inscribed in its bounding circle."""
    r = shape.radius
    if shape.kind == "circle":
        draw.ellipse((shape.cx - r, shape.cy - r, shape.cx + r, shape.cy + r), fill=shape.rgb)
    elif shape.kind == "square":
        half = r / math.sqrt(2.0)  # the square's corners touch the bounding circle
        box = (shape.cx - half, shape.cy - half, shape.cx + half, shape.cy + half)
        draw.rectangle(box, fill=shape.rgb)
    else:
        corners = [
            (shape.cx + r * math.cos(a), shape.cy + r * math.sin(a))
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)  # upright equilateral
        ]
        draw.polygon(corners, fill=shape.rgb)


def render_shapes(shapes: list[Shape], background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def generate_count_dataset(out_dir: Path, n: int, seed: int, split_name: str = "train") -> Path:
    """Draw `n` images of 1..9 shapes into `out_dir`; return the path of the format-(c) JSONL."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    jsonl = out_dir / f"{split_name}.jsonl"
    with jsonl.open("w", encoding="utf-8") as f:
        for i in range(n):
            count = rng.randint(MIN_COUNT, MAX_COUNT)
            background = (rng.randint(225, 255), rng.randint(225, 255), rng.randint(225, 255))
            image = render_shapes(place_shapes(rng, count), background)
            relative = f"images/{split_name}_{i:05d}.png"
            image.save(out_dir / relative, format="PNG")
            record = {
                "messages": [{"role": "user", "content": f"<image>{COUNT_QUERY}"}],
                "images": [relative],
                "solution": str(count),
            }
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return jsonl
