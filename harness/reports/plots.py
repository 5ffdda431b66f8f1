"""Inline SVG charts for the self-contained HTML report: no JavaScript, no CDN, no network."""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def line_chart(series: list[dict], title: str, metric: str, width: int = 300, height: int = 190) -> str:
    """series: [{"points": [(x, y)], "color", "width", "dash", "label"}]; non-finite y are skipped."""
    pts = [(x, y) for s in series for x, y in s["points"] if math.isfinite(y)]
    left, right, top, bottom = 44, 14, 22, 24
    head = (f'<svg class="plot" data-metric="{escape(metric)}" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'role="img" aria-label="{escape(title)}">')
    title_el = f'<text x="{width / 2}" y="14" text-anchor="middle" class="t">{escape(title)}</text>'
    if not pts:
        return f'{head}{title_el}<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="n">no data</text></svg>'
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    x1 = x1 if x1 > x0 else x0 + 1
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    out = [head, title_el,
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" class="frame"/>']
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" class="a">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{height - 8}" text-anchor="middle" class="a">{_fmt(t)}</text>')
    for s in series:
        good = [(x, y) for x, y in s["points"] if math.isfinite(y)]
        if not good:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        out.append(f'<polyline points="{coords}" fill="none" stroke="{s["color"]}" stroke-width="{s.get("width", 1)}"'
                   f' stroke-opacity="{s.get("opacity", 1)}"{dash}><title>{escape(s.get("label", ""))}</title></polyline>')
        if len(good) == 1:
            out.append(f'<circle cx="{sx(good[0][0]):.1f}" cy="{sy(good[0][1]):.1f}" r="2.5" fill="{s["color"]}"/>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(items: list[tuple[str, float | None, str]], title: str, metric: str, unit: str, width: int = 460) -> str:
    """items: [(label, value, color)], one horizontal bar each; None is drawn as 'n/a'."""
    row, left, top = 20, 190, 24
    height = top + row * len(items) + 8
    vmax = max((v for _, v, _ in items if v is not None), default=0) or 1
    out = [f'<svg class="plot bars" data-metric="{escape(metric)}" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
           f'<text x="4" y="14" class="t">{escape(title)}</text>']
    for i, (label, value, color) in enumerate(items):
        y = top + i * row
        short = label if len(label) <= 30 else label[:29] + "…"
        out.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end" class="a">{escape(short)}'
                   f'<title>{escape(label)}</title></text>')
        if value is None:
            out.append(f'<text x="{left + 4}" y="{y + 13}" class="n">n/a</text>')
            continue
        w = value / vmax * (width - left - 80)
        out.append(f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="{row - 6}" fill="{color}"/>'
                   f'<text x="{left + w + 4:.1f}" y="{y + 13}" class="a">{_fmt(value)} {escape(unit)}</text>')
    out.append("</svg>")
    return "".join(out)
