"""<run>/report.html: one self-contained page about a run, rebuilt at every save and at the end.

Curves are inline SVG drawn here (no script, no CDN: the page opens offline, from a copied
folder, or attached to an issue). Per logged step a few prompts are shown with their image as
a base64 thumbnail, the gold answer and the completions with their rewards. The inputs are the
run's own logs: metrics.jsonl and report_samples.jsonl (written by grpo/metrics.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

SAMPLES_FILE = "report_samples.jsonl"
PROMPTS_PER_STEP = 3
THUMBNAIL = 160  # pixels, longer side
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

# (title, does this metric belong to the panel); a metric may appear in several panels
PANELS: list[tuple[str, Any]] = [
    ("reward (mean, per function)", lambda k: k == "reward_mean" or (
        k.startswith("reward/") and k.endswith("_mean"))),
    ("evaluation", lambda k: k.startswith("eval/") and k != "eval/seconds"),
    ("KL", lambda k: k == "kl" or k.startswith("kl")),
    ("entropy", lambda k: k == "entropy"),
    ("clip fractions", lambda k: "clip" in k),
    ("completion length", lambda k: "length" in k and not k.startswith("eval/")),
    ("truncation", lambda k: "truncat" in k and not k.startswith("eval/")),
    ("sampler mismatch", lambda k: k.startswith("sampler/")),
    ("step time split (s)", lambda k: k.startswith("time/")),
]  # fmt: skip


def thumbnail_uri(image: Any) -> str | None:
    """A PIL image as a small PNG data: URI (None when there is no image)."""
    if image is None:
        return None
    image = image.copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_entries(step: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first PROMPTS_PER_STEP prompts of a step's completions, grouped, with thumbnails."""
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        key = record["where"]
        if key not in groups:
            if len(groups) == PROMPTS_PER_STEP:
                continue
            ref = record.get("_image")
            try:
                uri = thumbnail_uri(ref.open()) if ref is not None else None
            except Exception:  # a report must never stop training; the reference is shown
                uri = None
            groups[key] = {
                "step": step,
                **{k: record.get(k) for k in ("where", "prompt", "image", "solution")},
                "thumbnail": uri,
                "completions": [],
            }
        groups[key]["completions"].append(
            {k: record.get(k) for k in ("completion", "reward", "rewards", "advantage")}
        )
    return list(groups.values())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by a kill
            continue
    return rows


def svg_chart(title: str, series: dict[str, list[tuple[float, float]]]) -> str:
    """A line chart of (step, value) series: one <path> per series, axes, a legend."""
    w, h, left, right, top, bottom = 440, 220, 52, 10, 24, 28
    points = [p for values in series.values() for p in values]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return top + (y1 - y) / (y1 - y0) * (h - top - bottom)

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}"><title>{html.escape(title)}</title>',
        f'<text x="{left}" y="15" font-size="12" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w - left - right}" height="{h - top - bottom}" '
        'fill="none" stroke="#ccc"/>',
        f'<text x="{left - 4}" y="{top + 9}" font-size="9" text-anchor="end">{y1:.4g}</text>',
        f'<text x="{left - 4}" y="{h - bottom}" font-size="9" text-anchor="end">{y0:.4g}</text>',
        f'<text x="{left}" y="{h - bottom + 12}" font-size="9">{x0:g}</text>',
        f'<text x="{w - right}" y="{h - bottom + 12}" font-size="9" text-anchor="end">'
        f"step {x1:g}</text>",
    ]
    for i, (name, values) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        d = " ".join(
            f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(values)
        )
        if len(values) == 1:  # a single point: a dot, so it is seen
            d += " l0.1,0"
        parts.append(
            f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="1.5" '
            f'stroke-linecap="round"><title>{html.escape(name)}</title></path>'
        )
        parts.append(
            f'<text x="{w - right - 4}" y="{top + 12 + 11 * i}" font-size="9" fill="{colour}" '
            f'text-anchor="end">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def curves(rows: list[dict[str, Any]]) -> list[str]:
    """One SVG per panel that has at least one finite value."""
    keys = sorted({k for r in rows for k in r if k != "step"})
    charts = []
    for title, belongs in PANELS:
        series = {}
        for key in (k for k in keys if belongs(k)):
            values = [
                (float(r["step"]), float(r[key]))
                for r in rows
                if isinstance(r.get(key), int | float) and math.isfinite(r[key])
            ]
            if values:
                series[key] = values
        if series:
            charts.append(svg_chart(title, dict(list(series.items())[:8])))
    return charts


def sample_html(entry: dict[str, Any]) -> str:
    """One prompt of a logged step: image, prompt, gold, completions with rewards."""
    esc = html.escape
    image = (
        f'<img src="{entry["thumbnail"]}" alt="{esc(str(entry.get("image")))}">'
        if entry.get("thumbnail")
        else f'<span class="ref">{esc(str(entry.get("image") or "no image"))}</span>'
    )
    rows = "".join(
        f"<tr><td>{c['reward']:.3f}</td><td>{c['advantage']:+.3f}</td>"
        f"<td>{esc(json.dumps(c.get('rewards') or {}))}</td>"
        f"<td><pre>{esc(str(c['completion']))}</pre></td></tr>"
        for c in entry["completions"]
    )
    return (
        f'<div class="sample"><div class="img">{image}</div><div class="text">'
        f"<p><b>prompt</b> {esc(str(entry.get('prompt')))}</p>"
        f"<p><b>gold</b> {esc(str(entry.get('solution')))} <small>{esc(entry['where'])}</small></p>"
        "<table><tr><th>reward</th><th>advantage</th><th>per function</th><th>completion</th></tr>"
        f"{rows}</table></div></div>"
    )


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
.charts{display:flex;flex-wrap:wrap;gap:8px}.chart{border:1px solid #eee}
.sample{display:flex;gap:12px;margin:8px 0;border-top:1px solid #ddd;padding-top:8px}
.img img{border:1px solid #ccc}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ddd;padding:2px 6px;vertical-align:top}pre{margin:0;white-space:pre-wrap}
.ref{font-size:11px;color:#666}"""


def write_report(run_dir: Path) -> Path:
    """Build <run>/report.html from the run's logs (atomically: a reader never sees half)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    samples = read_jsonl(run_dir / SAMPLES_FILE)
    last = rows[-1]["step"] if rows else 0
    body = [f"<h1>{html.escape(run_dir.name)}</h1><p>{len(rows)} log records, last step {last}</p>"]
    body += ['<h2>Curves</h2><div class="charts">', *curves(rows), "</div>"]
    body.append("<h2>Completions</h2>")
    for step in sorted({e["step"] for e in samples}):
        body.append(f"<h3>step {step}</h3>")
        body += [sample_html(e) for e in samples if e["step"] == step]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(run_dir.name)} - vl-grpo report</title><style>{STYLE}</style>"
        f"</head><body>{''.join(body)}</body></html>"
    )
    out = run_dir / "report.html"
    tmp = run_dir / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
