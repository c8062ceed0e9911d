"""`groupflow report RUN [RUN ...]`: one self-contained HTML page with plots of the runs.

Plots are inline SVG drawn here (no plotting library, no script from the network): a page that opens
anywhere, years later. Several runs overlay their curves, one colour per run.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path

from .metrics import read_metrics

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
DASHES = ["", "6 3", "2 3", "8 3 2 3", "1 2"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 560, 270, 58, 12, 28, 76

# (title, y label, metric keys[, x key]): one line per key and run, against the step unless named
LINES = [
    ("Reward", "mean reward", ["reward_mean"]),
    ("Held-out accuracy", "pass@1", ["eval_pass@1"]),
    ("Held-out accuracy against training time", "pass@1", ["eval_pass@1"], "minutes"),
    ("KL and exact divergences", "nats", ["kl", "div_reverse_kl", "div_forward_kl", "div_js", "div_tv"]),
    ("Entropy", "nats / token", ["entropy"]),
    ("Response length", "tokens", ["response_length_mean"]),
    ("Truncated", "fraction of samples", ["truncated_fraction"]),
    ("Throughput", "generated tokens / s", ["generated_tokens_per_s"]),
    ("Failures and restarts", "count", ["reward_failures", "engine_restarts", "restarts"]),
]
PHASES = ["time_generate_s", "time_reward_s", "time_prepare_s", "time_update_s", "time_sync_s"]


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a groupflow run directory")
    rows = read_metrics(run_dir)
    for r in rows:  # the update alone: time_train_s holds the pi_old/pi_ref pass too
        if "time_train_s" in r:
            r["time_update_s"] = max(0.0, r["time_train_s"] - r.get("time_prepare_s", 0.0))
    minutes = 0.0
    for r in rows:  # training time so far (start-up and evaluations excluded): time to accuracy's axis
        minutes = r["minutes"] = minutes + r.get("time_step_s", 0.0) / 60
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    if summary.get("eval_accuracy_start") is not None and rows:  # held-out accuracy at start and end
        rows = [{"step": 0, "minutes": 0.0, "eval_pass@1": summary["eval_accuracy_start"]}] + rows
        if summary.get("eval_accuracy_end") is not None and "eval_pass@1" not in rows[-1]:
            rows[-1] = {**rows[-1], "eval_pass@1": summary["eval_accuracy_end"]}
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    return {"name": run_dir.name, "path": str(run_dir), "rows": rows, "summary": summary, "config": config}


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (whole numbers only, for steps)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, round(step))
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    return f"{v / 1000:.3g}k" if abs(v) >= 1000 else f"{v:.3g}"


class Frame:
    """Axes of one plot: data coordinates to pixels, and the SVG of the grid."""

    def __init__(self, xs: list[float], ys: list[float], ylabel: str, xlabel: str = "step"):
        self.xt = nice_ticks(min(xs), max(xs), integer=xlabel == "step")
        self.yt = nice_ticks(min(0.0, min(ys)), max(ys))
        self.ylabel, self.xlabel = ylabel, xlabel

    def x(self, v: float) -> float:
        return PAD_L + (v - self.xt[0]) / (self.xt[-1] - self.xt[0]) * (W - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        return H - PAD_B - (v - self.yt[0]) / (self.yt[-1] - self.yt[0]) * (H - PAD_T - PAD_B)

    def svg(self) -> str:
        out = []
        for t in self.yt:
            out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{self.y(t):.1f}" y2="{self.y(t):.1f}" class="grid"/>'
                       f'<text x="{PAD_L - 6}" y="{self.y(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        for t in self.xt:
            out.append(f'<text x="{self.x(t):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{_fmt(t)}</text>')
        out.append(f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - PAD_B + 32}" text-anchor="middle">{self.xlabel}</text>'
                   f'<text transform="translate(14 {(PAD_T + H - PAD_B) / 2}) rotate(-90)" '
                   f'text-anchor="middle">{html.escape(self.ylabel)}</text>')
        return "".join(out)


def _legend(items: list[tuple[str, str, str]]) -> str:
    """Below the axes, in rows of two."""
    out = []
    for i, (label, color, dash) in enumerate(items):
        x, y = PAD_L + (i % 2) * (W - PAD_L) / 2, H - PAD_B + 48 + (i // 2) * 15
        out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/><text x="{x + 22}" y="{y}">{html.escape(label)}</text>')
    return "".join(out)


def _svg(title: str, body: str, series: int) -> str:
    h = H + 15 * max(0, (series + 1) // 2 - 1)  # room for the legend's rows
    return (f'<svg class="plot" data-series="{series}" width="{W}" height="{h}" viewBox="0 0 {W} {h}" '
            f'xmlns="http://www.w3.org/2000/svg"><text x="{W / 2}" y="17" text-anchor="middle" class="title">'
            f'{html.escape(title)}</text>{body}</svg>')


def line_plot(title: str, ylabel: str, keys: list[str], runs: list[dict], x: str = "step") -> str | None:
    """One line per (run, key) that has values; None when no run logged any of the keys."""
    lines = []
    for ri, run in enumerate(runs):
        for ki, key in enumerate(keys):
            pts = [(r[x], r[key]) for r in run["rows"] if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key]) and x in r]
            if pts:
                label = key if len(runs) == 1 else (run["name"] if len(keys) == 1 else f"{run['name']}: {key}")
                lines.append((label, COLORS[ri % len(COLORS)] if len(runs) > 1 else COLORS[ki % len(COLORS)],
                              DASHES[ki % len(DASHES)] if len(runs) > 1 else "", pts))
    if not lines:
        return None
    frame = Frame([px for *_, p in lines for px, _ in p], [y for *_, p in lines for _, y in p], ylabel,
                  "minutes of training" if x == "minutes" else x)
    body = [frame.svg()]
    for label, color, dash, pts in lines:
        path = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in pts)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" '
                    f'stroke-dasharray="{dash}"/>')
        body += [f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
    body.append(_legend([(label, color, dash) for label, color, dash, _ in lines]))
    return _svg(title, "".join(body), len(lines))


def phase_bars(run: dict, title: str) -> str | None:
    """Stacked bars: each step's time split into its phases."""
    rows = [r for r in run["rows"] if "time_step_s" in r]
    if not rows:
        return None
    frame = Frame([rows[0]["step"] - 0.5, rows[-1]["step"] + 0.5],
                  [sum(r.get(k, 0.0) for k in PHASES) for r in rows], "seconds")
    bw = max(2.0, 0.7 * (frame.x(1) - frame.x(0)))
    body = [frame.svg()]
    for r in rows:
        base = 0.0
        for i, key in enumerate(PHASES):
            v = r.get(key, 0.0)
            if v > 0:
                top, bottom = frame.y(base + v), frame.y(base)
                body.append(f'<rect x="{frame.x(r["step"]) - bw / 2:.1f}" y="{top:.1f}" width="{bw:.1f}" '
                            f'height="{max(0.5, bottom - top):.1f}" fill="{COLORS[i]}"/>')
                base += v
    body.append(_legend([(k.removeprefix("time_").removesuffix("_s"), COLORS[i], "") for i, k in enumerate(PHASES)]))
    return _svg(title, "".join(body), len(PHASES))


CHECK = """<script>
// Lets a headless browser (tests/e2e/test_report.py) see what rendered: each plot's size and marks.
const plots = [...document.querySelectorAll('svg.plot')].map(s => {
  const r = s.getBoundingClientRect();
  return {x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height,
          marks: s.querySelectorAll('polyline, rect, circle').length};
});
document.getElementById('render-check').textContent = JSON.stringify(plots);
</script>"""


def render(run_dirs: list[Path]) -> str:
    runs = [load_run(Path(d)) for d in run_dirs]
    plots = [p for title, ylabel, keys, *x in LINES if (p := line_plot(title, ylabel, keys, runs, *x))]
    plots += [p for run in runs if (p := phase_bars(run, f"Time per step by phase: {run['name']}"))]
    names = ", ".join(run["name"] for run in runs)
    details = "".join(
        f"<details><summary>{html.escape(run['name'])}: summary and config</summary>"
        f"<p>{html.escape(run['path'])}</p><pre>{html.escape(json.dumps(run['summary'], indent=2))}</pre>"
        f"<pre>{html.escape(run['config'])}</pre></details>" for run in runs)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>groupflow report: {html.escape(names)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 24px; color: #222; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 12px; }}
svg.plot {{ border: 1px solid #ddd; background: #fff; }}
svg text {{ font-size: 11px; fill: #333; }} svg text.title {{ font-size: 13px; font-weight: 600; }}
.grid {{ stroke: #eee; }} pre {{ background: #f6f6f6; padding: 8px; overflow-x: auto; }}
#render-check {{ display: none; }}
</style></head><body>
<h1>groupflow report</h1><p>{html.escape(names)}: {sum(len([r for r in run['rows'] if r.get('step', 0) > 0])
                                                        for run in runs)} steps</p>
<div class="plots">{''.join(plots)}</div>
{details}
<pre id="render-check"></pre>
{CHECK}
</body></html>
"""


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    out = Path(out) if out else Path(run_dirs[0]) / "report.html"
    out.write_text(render(run_dirs))
    return out

