#!/usr/bin/env python3
"""Draws the benchmark's results as a grouped bar chart with Pillow.

    python3 bench/plot.py bench-results.json bench-results.png

One group of bars per seed, one bar per method: the median spawn-to-answer time on a
logarithmic millisecond axis, labelled with its value. Methods without samples are left out.
"""

import json
import math
import sys

from PIL import Image, ImageDraw, ImageFont

METHODS = [
    ("cold_start", "cold start", (214, 96, 77)),
    ("local_fork", "local fork", (120, 120, 120)),
    ("mitosis_first_child", "mitosis first child", (158, 202, 225)),
    ("mitosis_cold_host", "mitosis cold host", (67, 147, 195)),
    ("mitosis_warm_host", "mitosis warm host", (33, 102, 172)),
    ("mitosis_warm_host_cli", "mitosis warm host (CLI)", (8, 48, 107)),
    ("mitosis_cold_host_tls", "mitosis cold host (mTLS)", (253, 174, 97)),
    ("mitosis_warm_host_tls", "mitosis warm host (mTLS)", (230, 97, 1)),
    ("criu", "criu restore", (146, 197, 122)),
    ("criu_lazy", "criu lazy migration", (77, 146, 33)),
]
WIDTH, HEIGHT = 1400, 720
LEFT, RIGHT, TOP, BOTTOM = 90, 30, 80, 110


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def text_width(draw, text, fnt):
    left, _, right, _ = draw.textbbox((0, 0), text, font=fnt)
    return right - left


def medians(results):
    """{seed: {method key: median ms}} of the methods that have samples."""
    out = {}
    for seed in results["seeds"]:
        out[seed["name"]] = {
            m["key"]: m["median_ms"] for m in seed["methods"] if m.get("median_ms")
        }
    return out


def draw_chart(results, path):
    data = medians(results)
    seeds = list(data)
    keys = [k for k, _, _ in METHODS if any(k in data[s] for s in seeds)]
    values = [v for s in seeds for v in data[s].values()]
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    title, small, tiny = font(22), font(15), font(12)
    draw.text(
        (LEFT, 20),
        "mitosis-bench: median spawn-to-answer per seed (ms, log scale)",
        fill="black",
        font=title,
    )
    if not values:
        draw.text((LEFT, HEIGHT // 2), "no samples", fill="black", font=title)
        img.save(path)
        return

    lo = 10 ** math.floor(math.log10(min(values)))
    hi = 10 ** math.ceil(math.log10(max(values)))
    if hi <= lo:
        hi = lo * 10
    plot_h = HEIGHT - TOP - BOTTOM
    base = HEIGHT - BOTTOM

    def y_of(ms):
        frac = (math.log10(ms) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return base - frac * plot_h

    # Decade grid lines and labels.
    decade = lo
    while decade <= hi * 1.0001:
        y = y_of(decade)
        draw.line([(LEFT, y), (WIDTH - RIGHT, y)], fill=(225, 225, 225))
        label = ("%g" % decade) + " ms"
        draw.text((LEFT - 8 - text_width(draw, label, small), y - 8), label, fill="black", font=small)
        decade *= 10
    draw.line([(LEFT, TOP), (LEFT, base)], fill="black")
    draw.line([(LEFT, base), (WIDTH - RIGHT, base)], fill="black")

    group_w = (WIDTH - LEFT - RIGHT) / max(len(seeds), 1)
    bar_w = min(60, (group_w * 0.8) / max(len(keys), 1))
    for i, seed in enumerate(seeds):
        x0 = LEFT + i * group_w + (group_w - bar_w * len(keys)) / 2
        for j, key in enumerate(keys):
            ms = data[seed].get(key)
            if not ms:
                continue
            color = next(c for k, _, c in METHODS if k == key)
            x = x0 + j * bar_w
            draw.rectangle([x + 2, y_of(ms), x + bar_w - 2, base], fill=color)
            label = "%.0f" % ms if ms >= 100 else "%.3g" % ms
            lw = text_width(draw, label, tiny)
            draw.text((x + (bar_w - lw) / 2, y_of(ms) - 15), label, fill="black", font=tiny)
        sw = text_width(draw, seed, small)
        draw.text((LEFT + i * group_w + (group_w - sw) / 2, base + 8), seed, fill="black", font=small)

    # Legend.
    x = LEFT
    for key, name, color in METHODS:
        if key not in keys:
            continue
        draw.rectangle([x, HEIGHT - 45, x + 16, HEIGHT - 29], fill=color)
        draw.text((x + 22, HEIGHT - 46), name, fill="black", font=small)
        x += 40 + text_width(draw, name, small)
    img.save(path)


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: plot.py RESULTS.json OUT.png\n")
        return 2
    with open(argv[0]) as f:
        results = json.load(f)
    draw_chart(results, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
