"""PNG plots drawn with Pillow alone (the project keeps matplotlib out of its dependencies).

    line_plot("lr_find.png", [(lrs, losses, "smoothed loss")], "learning rate", "loss",
              logx=True, marks=[(2e-3, 0.41, "valley 2.0e-03")])
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
LIGHT, GREY = (180, 200, 225), (150, 150, 150)  # a noisy raw series; a reference line


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # scalable, where Pillow has FreeType
    except TypeError:
        return ImageFont.load_default()


def _ticks(lo, hi, logx):
    """About five round tick positions between lo and hi (decades on a log axis)."""
    if logx:
        return [10.0 ** e for e in range(math.ceil(math.log10(lo)), math.floor(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10((hi - lo) / 5 or 1))
    step *= min((m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 6), default=10)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _fmt(v, logx):
    return f"1e{round(math.log10(v))}" if logx else f"{v:.3g}"


def line_plot(path, series, xlabel, ylabel, title="", logx=False, marks=(), size=(800, 500),
              colours=COLOURS, legend_at="top", logy=False, bands=()):
    """Draw series [(xs, ys, label), ...] into a PNG at path; marks [(x, y, label)] as dots.

    colours: one per series, in order; legend_at: "top" or "bottom" (right-hand corner);
    logy: a log axis for y (one spike no longer flattens the rest); bands [(x from, x to,
    label)]: spans shaded in turn and labelled at the top (a run's stages and phases)."""
    if logy:  # drawn as log10(y), ticks put back in y's units below
        series = [(xs, [math.log10(y) if y > 0 else math.nan for y in ys], label)
                  for xs, ys, label in series]
    W, H = size
    left, right, top, bottom = 80, 20, 80 if bands else 40, 60  # bands: labelled above
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    pts = [(x, y) for xs, ys, _ in series for x, y in zip(xs, ys)
           if math.isfinite(y) and (x > 0 or not logx)] or [(1, 0), (10, 1)]  # nothing: a frame
    fx = math.log10 if logx else (lambda v: v)
    x0, x1 = min(fx(p[0]) for p in pts), max(fx(p[0]) for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = x1 + (x1 == x0), y1 + (y1 == y0)  # a flat series still gets an axis
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    px = lambda v: left + (fx(v) - x0) / (x1 - x0) * (W - left - right)
    py = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)

    for k, (b0, b1, label) in enumerate(bands):  # shaded in turn; labelled above the frame,
        a, b = max(px(b0), left), min(px(b1), W - right)  # in two rows, never off its edges
        if k % 2 == 0:
            d.rectangle([a, top, b, H - bottom], fill=(240, 240, 248))
        half = d.textlength(label, font=_font(12)) / 2
        x = min(max((a + b) / 2, left + half), W - right - half)
        d.text((x, top - 4 - 14 * (k % 2)), label, fill=GREY, font=_font(12), anchor="mb")
    for t in _ticks(10 ** x0 if logx else x0, 10 ** x1 if logx else x1, logx):
        x = px(t)
        d.line([x, H - bottom, x, H - bottom + 5], fill="black")
        d.line([x, top, x, H - bottom], fill=(230, 230, 230))
        d.text((x, H - bottom + 8), _fmt(t, logx), fill="black", font=small, anchor="mt")
    for t in _ticks(y0, y1, False):
        y = py(t)
        d.line([left - 5, y, left, y], fill="black")
        d.line([left, y, W - right, y], fill=(230, 230, 230))
        d.text((left - 8, y), f"{10 ** t:.3g}" if logy else _fmt(t, False), fill="black",
               font=small, anchor="rm")
    d.rectangle([left, top, W - right, H - bottom], outline="black")  # over the grid lines
    d.text(((left + W - right) / 2, H - 18), xlabel, fill="black", font=font, anchor="mm")
    d.text((10, 28 if bands else top - 25), ylabel, fill="black", font=font)
    d.text((W / 2, 12), title, fill="black", font=font, anchor="mt")

    ly = top + 15 if legend_at == "top" else H - bottom - 15 - 20 * (len(series) - 1)
    lx = W - right - 15 - max([d.textlength(s[2], font=small) for s in series] or [0])
    for k, (xs, ys, label) in enumerate(series):
        c = colours[k % len(colours)]
        line = [(px(x), py(y)) for x, y in zip(xs, ys)
                if math.isfinite(y) and y0 <= y <= y1 and (x > 0 or not logx)]
        if len(line) > 1:
            d.line(line, fill=c, width=3, joint="curve")
        d.line([lx - 30, ly + 20 * k, lx - 5, ly + 20 * k], fill=c, width=3)
        d.text((lx, ly + 20 * k), label, fill="black", font=small, anchor="lm")
    for x, y, label in marks:
        d.ellipse([px(x) - 6, py(y) - 6, px(x) + 6, py(y) + 6], outline=(214, 39, 40), width=3)
        d.text((px(x) + 10, py(y) - 10), label, fill=(214, 39, 40), font=small, anchor="ld")
    img.save(path)


def confusion_plot(path, cm, classes, title="confusion matrix"):
    """Confusion matrix as a PNG: counts in cells shaded by the row's fraction (sensitivity
    on the diagonal), true classes down, predicted across."""
    C = len(classes)
    cell, left, top = 110, 150, 90
    W, H = left + C * cell + 30, top + C * cell + 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(14)
    d.text((W / 2, 12), title, fill="black", font=font, anchor="mt")
    d.text((left + C * cell / 2, top - 50), "predicted", fill="black", font=font, anchor="mm")
    d.text((12, top + C * cell + 35), "rows: true class", fill="black", font=small)
    for i, row in enumerate(cm):
        total = sum(row)
        for j, v in enumerate(row):
            frac = v / total if total else 0.0
            shade = (int(255 - 200 * frac), int(255 - 130 * frac), 255)  # white -> blue
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=shade, outline="grey")
            ink = "white" if frac > 0.6 else "black"
            d.text((x0 + cell / 2, y0 + cell / 2 - 9), str(v), fill=ink, font=font, anchor="mm")
            d.text((x0 + cell / 2, y0 + cell / 2 + 12), f"{100 * frac:.0f}%", fill=ink,
                   font=small, anchor="mm")
    for k, c in enumerate(classes):
        d.text((left + k * cell + cell / 2, top - 10), c[:14], fill="black", font=small,
               anchor="mb")
        d.text((left - 8, top + k * cell + cell / 2), c[:18], fill="black", font=small,
               anchor="rm")
    img.save(path)


def dot_plot(path, rows, title="", percent=False, size_w=900):
    """One row per group [(label, values, mean, lo, hi)]: a dot per value, the mean as a black
    bar, [lo, hi] as a grey line (skipped where not finite, e.g. a single run)."""
    W, left, right, top, row_h = size_w, 260, 30, 50, 44
    H = top + row_h * len(rows) + 60
    vals = [v for _, vs, m, lo, hi in rows for v in [*vs, m, lo, hi] if math.isfinite(v)]
    x0, x1 = min(vals), max(vals)
    pad = 0.05 * (x1 - x0 or 0.1)
    x0, x1 = x0 - pad, x1 + pad
    px = lambda v: left + (v - x0) / (x1 - x0) * (W - left - right)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    d.text((W / 2, 14), title, fill="black", font=font, anchor="mt")
    bottom = top + row_h * len(rows)
    for t in _ticks(x0, x1, False):
        d.line([px(t), top, px(t), bottom], fill=(230, 230, 230))
        d.text((px(t), bottom + 8), f"{100 * t:.0f}%" if percent else _fmt(t, False),
               fill="black", font=small, anchor="mt")
    d.rectangle([left, top, W - right, bottom], outline="black")
    for i, (label, vs, mean, lo, hi) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        d.text((left - 10, y), label[:34], fill="black", font=small, anchor="rm")
        if math.isfinite(lo) and math.isfinite(hi):
            d.line([px(lo), y, px(hi), y], fill=GREY, width=3)
        d.line([px(mean), y - 12, px(mean), y + 12], fill="black", width=3)
        for v in vs:
            d.ellipse([px(v) - 5, y - 5, px(v) + 5, y + 5], fill=COLOURS[i % len(COLOURS)],
                      outline="black")
    d.text(((left + W - right) / 2, H - 16), "dots: runs; black bar: mean; grey: 95% interval "
           "of the mean", fill="black", font=small, anchor="mm")
    img.save(path)


def jet(t):
    """Colour map for values in [0, 1]: blue, cyan, yellow, red. (H, W) -> (H, W, 3) uint8."""
    rgb = [np.clip(1.5 - np.abs(4 * t - k), 0, 1) for k in (3, 2, 1)]
    return (np.stack(rgb, -1) * 255).astype(np.uint8)


def top_losses_plot(path, tiles, tile=224, cols=3):
    """fastai's plot_top_losses(heatmap=True): tiles [(film (S, S) in [0, 1], Grad-CAM (h, w)
    in [0, 1], caption)], each film as the model saw it with its heat map, captioned."""
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 22) + 30), "white")
    d = ImageDraw.Draw(sheet)
    d.text((cols * tile / 2, 8), "top losses: true / predicted / p(true), Grad-CAM of the "
           "predicted class", fill="black", font=_font(14), anchor="mt")
    for k, (film, cam, caption) in enumerate(tiles):
        x, y = (k % cols) * tile, 30 + (k // cols) * (tile + 22)
        gray, heat = (np.asarray(Image.fromarray((a.numpy() * 255).clip(0, 255).astype(np.uint8))
                                 .resize((tile, tile), Image.Resampling.BILINEAR), np.float32)
                      for a in (film, cam))  # each in [0, 255] at the tile's size
        blend = 0.55 * gray[..., None] + 0.45 * jet(heat / 255).astype(np.float32)
        sheet.paste(Image.fromarray(blend.round().astype(np.uint8)), (x, y))
        d.text((x + tile / 2, y + tile + 3), caption, fill="black", font=_font(13), anchor="mt")
    sheet.save(path)
