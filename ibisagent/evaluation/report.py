"""Reports of an evaluation run: summary tables (Markdown, CSV), plots (PNG) and one self-contained HTML page.

Summary metrics per group (overall, per modality, per target) and method, as the paper and the interactive
segmentation literature report them:

* IoU, DSC: means over cases of the final mask's IoU / Dice against the ground truth, in %.
* F1: entity F1 (`ibisagent.metrics.entity_f1`) over the group's cases, 2TP / (2TP + FP + FN), in %.
* NoC@85, NoC@90: mean number of clicks to reach IoU 0.85 / 0.90; a case that never does counts noc_max + 1.
* IoU@k: mean IoU after k clicks (k = 1, 3, 5, 10; a trajectory that stopped earlier keeps its last IoU), in %.
* steps: mean model turns; clicks: mean clicks spent; fail: cases with no mask, invalid output, a policy error or an
  error (broken down in the failure table); s/case: mean wall seconds per case, the tool's image encode included.

The HTML report inlines every image as base64 PNG and needs no network: summary tables, plots, then one section per
case with the image, the ground truth and, per method, the overlay after every step (click markers: yellow =
positive, red = negative), the IoU per step and the model's text.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from ibisagent.evaluation.cases import Case
from ibisagent.evaluation.runner import FAILURES, K_CLICKS
from ibisagent.metrics import iou_at
from ibisagent.render import MASK_ALPHA, MASK_COLOR, overlay
from ibisagent.trajectory import Trajectory
from ibisagent.types import Click

GROUPINGS = ("overall", "modality", "target")
SUMMARY_FIELDS = (
    "group_by",
    "group",
    "method",
    "n",
    "iou_pct",
    "dice_pct",
    "f1_pct",
    "noc85",
    "noc90",
    *(f"iou_at{k}_pct" for k in K_CLICKS),
    "steps",
    "clicks",
    "failures",
    *FAILURES,
    "seconds",
)
_COLUMNS = (  # (summary field, Markdown header, format)
    ("n", "n", "{:d}"),
    ("iou_pct", "IoU %", "{:.2f}"),
    ("dice_pct", "DSC %", "{:.2f}"),
    ("f1_pct", "F1 %", "{:.2f}"),
    ("noc85", "NoC@85", "{:.2f}"),
    ("noc90", "NoC@90", "{:.2f}"),
    *((f"iou_at{k}_pct", f"IoU@{k} %", "{:.2f}") for k in K_CLICKS),
    ("steps", "steps", "{:.2f}"),
    ("clicks", "clicks", "{:.2f}"),
    ("failures", "fail", "{:d}"),
    ("seconds", "s/case", "{:.2f}"),
)


# -- tables ----------------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _aggregate(rows: list[dict]) -> dict:
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
    denom = 2 * tp + fp + fn
    out = {
        "n": len(rows),
        "iou_pct": 100 * _mean([r["iou"] for r in rows]),
        "dice_pct": 100 * _mean([r["dice"] for r in rows]),
        "f1_pct": 100.0 * (1.0 if denom == 0 else 2 * tp / denom),
        "noc85": _mean([r["noc85"] for r in rows]),
        "noc90": _mean([r["noc90"] for r in rows]),
        **{f"iou_at{k}_pct": 100 * _mean([r[f"iou_at{k}"] for r in rows]) for k in K_CLICKS},
        "steps": _mean([r["steps"] for r in rows]),
        "clicks": _mean([r["clicks"] for r in rows]),
        "failures": sum(1 for r in rows if r["failure"]),
        **{f: sum(1 for r in rows if r["failure"] == f) for f in FAILURES},
        "seconds": _mean([r["seconds"] for r in rows]),
    }
    return out


def summarize(rows: Sequence[dict], methods: Sequence[str]) -> list[dict]:
    """Summary rows (SUMMARY_FIELDS) for every grouping × group × method; groups sorted by name, methods in order."""
    out = []
    for grouping in GROUPINGS:
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            groups["all" if grouping == "overall" else r[grouping]].append(r)
        for name in sorted(groups):
            for m in methods:
                subset = [r for r in groups[name] if r["method"] == m]
                if subset:
                    out.append({"group_by": grouping, "group": name, "method": m, **_aggregate(subset)})
    return out


def _cell(value, fmt: str) -> str:
    if isinstance(value, float) and not np.isfinite(value):
        return "–"
    return fmt.format(value)


def markdown_table(summary: Sequence[dict], grouping: str) -> str:
    """One Markdown table of the summary rows of one grouping."""
    first = [] if grouping == "overall" else [grouping]
    head = [*first, "method", *(h for _, h, _ in _COLUMNS)]
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * (len(first) + 1) + ["---:"] * len(_COLUMNS)) + "|",
    ]
    for s in summary:
        if s["group_by"] == grouping:
            cells = [s["group"]] if first else []
            cells += [s["method"], *(_cell(s[k], fmt) for k, _, fmt in _COLUMNS)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failure_table(summary: Sequence[dict]) -> str:
    """Markdown: failures per method (overall), by kind."""
    lines = ["| method | " + " | ".join(FAILURES) + " | total |", "|---|" + "---:|" * (len(FAILURES) + 1)]
    for s in summary:
        if s["group_by"] == "overall":
            lines.append(f"| {s['method']} | " + " | ".join(str(s[f]) for f in FAILURES) + f" | {s['failures']} |")
    return "\n".join(lines)


_DEFINITIONS = (
    "IoU, DSC: mean over cases, %. F1: entity F1 over the group's cases (a prediction with IoU >= 0.5 finds its "
    "entity), %. NoC@85/@90: mean clicks to reach IoU 0.85/0.90 ({cap} when never reached). IoU@k: IoU after k "
    "clicks, %. steps: model turns; clicks: clicks spent; fail: no mask, invalid output, policy error or error. "
    "s/case: wall seconds per case including the tool's image encode."
)


def definitions(info: dict, methods: Sequence[str]) -> str:
    """The one-paragraph legend of the tables (Markdown and HTML)."""
    text = _DEFINITIONS.format(cap=int(info.get("noc_max", 20)) + 1)
    if "box" in methods:
        text += (
            " The box baseline gives the ground-truth box as 5 clicks in one step (centre positive, 4 outside corners"
            " negative; fewer where the box touches the image border): its IoU reaches its final value at its last"
            " click, and IoU@k for earlier clicks is the IoU before the step (0)."
        )
    return text


def write_summary(out_dir: str | Path, rows: Sequence[dict], methods: Sequence[str], info: dict) -> list[dict]:
    """Write summary.md and summary.csv into out_dir; returns the summary rows."""
    out_dir = Path(out_dir)
    summary = summarize(rows, methods)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for s in summary:
            writer.writerow({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()})
    n_cases = len({r["case_id"] for r in rows})
    parts = [
        "# IBISAgent evaluation",
        "",
        f"benchmark: `{info.get('benchmark')}` ({info.get('format')}, {n_cases} cases); tool: {info.get('tool')}; "
        f"methods: {', '.join(f'{m} = {lab}' for m, lab in info.get('method_labels', {}).items()) or ', '.join(methods)}",
        "",
        definitions(info, methods),
        "",
        "## Overall",
        "",
        markdown_table(summary, "overall"),
        "",
        "## Per modality",
        "",
        markdown_table(summary, "modality"),
        "",
        "## Per target",
        "",
        markdown_table(summary, "target"),
        "",
        "## Failures",
        "",
        failure_table(summary),
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(parts))
    return summary


# -- plots -----------------------------------------------------------------------------------------------------------
def _carry(curve: list[float], length: int) -> list[float]:
    if not curve:
        return [0.0] * length
    return [curve[min(i, len(curve) - 1)] for i in range(length)]


def _mean_curves(rows: Sequence[dict], key: str, length: int) -> np.ndarray:
    return np.mean([_carry(r[key], length) for r in rows], axis=0) if rows else np.zeros(length)


def write_plots(out_dir: str | Path, rows: Sequence[dict], methods: Sequence[str], noc_max: int) -> list[Path]:
    """iou_vs_step.png, iou_vs_click.png (one panel per modality and one for all) and modality_bars.png.
    Returns the written paths; none when matplotlib is not installed (a warning says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        import sys

        print("ibisagent: warning: matplotlib is not installed; no plots (pip install matplotlib)", file=sys.stderr)
        return []
    out_dir = Path(out_dir)
    modalities = sorted({r["modality"] for r in rows})
    panels = [*modalities, "all"]
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    written = []

    def panel_grid(n):
        cols = min(4, n)
        nrows = -(-n // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False, sharey=True)
        for ax in axes.ravel()[n:]:
            ax.set_visible(False)
        return fig, axes.ravel()

    for key, xlabel, fname in (
        ("step_iou", "step (0 = before the first turn)", "iou_vs_step.png"),
        ("click_iou", "clicks", "iou_vs_click.png"),
    ):
        fig, axes = panel_grid(len(panels))
        for ax, panel in zip(axes, panels):
            subset = [r for r in rows if panel == "all" or r["modality"] == panel]
            for m in methods:
                mrows = [r for r in subset if r["method"] == m]
                if not mrows:
                    continue
                if key == "step_iou":
                    length = max(len(r[key]) for r in mrows)
                    xs = np.arange(length)
                    ys = _mean_curves(mrows, key, length)
                else:
                    xs = np.arange(1, noc_max + 1)
                    ys = np.mean([[iou_at(r[key], k) for k in xs] for r in mrows], axis=0)
                ax.plot(xs, 100 * ys, marker="o", markersize=2.5, color=colors[m], label=f"{m} (n={len(mrows)})")
            ax.set_title(panel)
            ax.set_xlabel(xlabel)
            ax.set_ylim(0, 100)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        axes[0].set_ylabel("mean IoU %")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=90)
        plt.close(fig)
        written.append(out_dir / fname)

    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(panels) * 2), 3.8), squeeze=False)
    width = 0.8 / max(1, len(methods))
    for ax, metric, title in zip(axes[0], ("iou", "dice"), ("IoU %", "DSC %")):
        for i, m in enumerate(methods):
            vals = [
                100 * _mean([r[metric] for r in rows if r["method"] == m and (p == "all" or r["modality"] == p)])
                for p in panels
            ]
            ax.bar(np.arange(len(panels)) + (i - (len(methods) - 1) / 2) * width, np.nan_to_num(vals), width, label=m)
        ax.set_xticks(np.arange(len(panels)))
        ax.set_xticklabels(panels, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"final {title} per modality")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "modality_bars.png", dpi=90)
    plt.close(fig)
    written.append(out_dir / "modality_bars.png")
    return written


# -- HTML ------------------------------------------------------------------------------------------------------------
def _png_b64(image: np.ndarray | Image.Image) -> str:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


class _Thumbs:
    """Thumbnails of one case: the image once (a CSS background of class `bg<index>`), and per step a transparent
    layer with the mask and the click markers, which the browser composites exactly as `ibisagent.render.overlay`
    blends (mask colour at MASK_ALPHA, opaque markers). The page then stores each image once, not once per step."""

    def __init__(self, image: np.ndarray, size: int, index: int):
        h, w = image.shape[:2]
        self.scale = min(1.0, size / max(h, w))
        self.shape = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        self.image = np.asarray(Image.fromarray(image).resize(self.shape[::-1], Image.BILINEAR))
        self.radius = max(3, max(self.shape) // 48)
        self.cls = f"bg{index}"

    def style(self) -> str:
        """The CSS rule that holds this case's image."""
        return f".{self.cls}{{background-image:url(data:image/png;base64,{_png_b64(self.image)})}}"

    def layer(self, mask: np.ndarray | None, clicks: Sequence[Click] = ()) -> str:
        """RGBA PNG (base64) of `mask` (HxW bool at the original size) and `clicks` ((x, y) original pixels)."""
        h, w = self.shape
        rgba = np.zeros((h, w, 4), np.uint8)
        if mask is not None:
            small = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
            rgba[small] = (*MASK_COLOR, round(255 * MASK_ALPHA))
        if clicks:
            scaled = [Click(c.x * self.scale, c.y * self.scale, c.positive, c.target) for c in clicks]
            markers = overlay(np.zeros((h, w, 3), np.uint8), None, scaled, marker_radius=self.radius)
            drawn = markers.any(axis=2)
            rgba[drawn, :3], rgba[drawn, 3] = markers[drawn], 255
        return _png_b64(Image.fromarray(rgba, "RGBA"))

    def figure(self, caption: str, layer: str | None = None) -> str:
        img = "" if layer is None else _img(layer, caption)
        return (
            f'<figure><div class="thumb {self.cls}" style="width:{self.shape[1]}px;height:{self.shape[0]}px">{img}'
            f"</div><figcaption>{html.escape(caption)}</figcaption></figure>"
        )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}h3{font-size:15px;margin:4px 0}
h4{font-size:13px;margin:10px 0 4px}table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,th:first-child,td.l{text-align:left}
.case{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:14px 0}.meta{color:#555;font-size:12px;margin:2px 0}
.strip{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start}figure{margin:0;font-size:11px;text-align:center}
figure img{display:block}.thumb{border:1px solid #999;background-size:100% 100%}
.thumb img{width:100%;height:100%}.plots img{max-width:100%;border:1px solid #ddd;margin:4px 0}
.noimg{display:flex;align-items:center;justify-content:center;border:1px dashed #c33;color:#c33;font-size:11px}
pre{white-space:pre-wrap;font-size:11px;background:#f6f6f6;padding:4px;margin:2px 0}.fail{color:#c33;font-weight:600}
details{font-size:12px}.index a{margin-right:8px;font-size:12px}
"""


def _html_table(summary: Sequence[dict], grouping: str) -> str:
    first = [] if grouping == "overall" else [grouping]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in [*first, "method", *(h for _, h, _ in _COLUMNS)])
    body = []
    for s in summary:
        if s["group_by"] == grouping:
            cells = [f'<td class="l">{html.escape(s["group"])}</td>'] if first else []
            cells.append(f'<td class="l">{html.escape(s["method"])}</td>')
            cells += [f"<td>{_cell(s[k], fmt)}</td>" for k, _, fmt in _COLUMNS]
            body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="summary" data-grouping="{grouping}"><tr>{head}</tr>{"".join(body)}</table>'


def _method_block(row: dict, label: str, traj: Trajectory | None, thumbs: _Thumbs) -> str:
    fail = f' <span class="fail">failure: {html.escape(row["failure"])}</span>' if row["failure"] else ""
    head = (
        f'<h4>{html.escape(row["method"])} <span class="meta">({html.escape(label)})</span> — IoU {row["iou"]:.3f} · '
        f"DSC {row['dice']:.3f} · {row['steps']} steps · {row['clicks']} clicks · stop: "
        f"{html.escape(str(row['stop_reason']))} · {row['seconds']:.2f} s{fail}</h4>"
    )
    if row["error"]:
        head += f'<p class="meta fail">{html.escape(row["error"])}</p>'
    if traj is None:
        return f'<div class="method" data-method="{html.escape(row["method"])}">{head}</div>'
    figs, texts = [], []
    step_iou = row["step_iou"]
    for step in traj.steps:
        value = step_iou[step.index + 1] if step.index + 1 < len(step_iou) else float("nan")
        caption = f"step {step.index + 1} · IoU {value:.3f}"
        if step.error:
            figs.append(
                f'<figure><div class="noimg" style="width:{thumbs.shape[1]}px;height:{thumbs.shape[0]}px">invalid '
                f"output</div><figcaption>{html.escape(caption)}</figcaption></figure>"
            )
        elif step.masks and not (step.action is not None and (step.action.terminate or step.action.undo) and figs):
            mask = np.logical_or.reduce(list(step.masks.values()))
            clicks = [c for cs in step.clicks.values() for c in cs]
            figs.append(thumbs.figure(caption, thumbs.layer(mask, clicks)))
        texts.append(f"<li><pre>{html.escape(step.text)}</pre></li>")
    return (
        f'<div class="method" data-method="{html.escape(row["method"])}">{head}<div class="strip">{"".join(figs)}</div>'
        f"<details><summary>model text ({len(traj.steps)} turns)</summary><ol>{''.join(texts)}</ol></details></div>"
    )


def write_html(
    out_dir: str | Path,
    cases: Sequence[Case],
    rows: Sequence[dict],
    summary: Sequence[dict],
    methods: Sequence[str],
    info: dict,
    plots: Sequence[Path] = (),
    thumb: int = 256,
    max_cases: int | None = None,
) -> Path:
    """Write report.html (self-contained) into out_dir; `max_cases` limits the per-case sections (tables and plots
    always cover every case)."""
    out_dir = Path(out_dir)
    by_case: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_case[r["case_id"]][r["method"]] = r
    labels = info.get("method_labels", {})
    shown = [c for c in cases if c.case_id in by_case][:max_cases]
    sections, styles = [], []
    for case in shown:
        try:
            image, gt = case.load()
        except Exception as exc:  # the row says what went wrong; the report still renders the rest
            sections.append(
                f'<section class="case" id="case-{html.escape(case.case_id)}"><h3>{html.escape(case.case_id)}</h3>'
                f'<p class="fail">cannot show: {html.escape(str(exc))}</p></section>'
            )
            continue
        thumbs = _Thumbs(image, thumb, len(styles))
        styles.append(thumbs.style())
        blocks = []
        for m in methods:
            row = by_case[case.case_id].get(m)
            if row is None:
                continue
            traj = None
            if row["trajectory"] and (out_dir / row["trajectory"]).is_file():
                traj = Trajectory.from_json(out_dir / row["trajectory"])
            blocks.append(_method_block(row, labels.get(m, m), traj, thumbs))
        where = f" · slice {case.slice_index}" if case.slice_index is not None else ""
        sections.append(
            f'<section class="case" id="case-{html.escape(case.case_id)}" data-case="{html.escape(case.case_id)}">'
            f"<h3>{html.escape(case.case_id)}</h3>"
            f'<p class="meta">{html.escape(case.modality)} · target: {html.escape(case.target)} · question: '
            f"{html.escape(case.question)} · {html.escape(case.image.name)}{where}</p>"
            f'<div class="strip">{thumbs.figure("image")}{thumbs.figure("ground truth", thumbs.layer(gt))}</div>'
            f"{''.join(blocks)}</section>"
        )
    plot_html = "".join(
        f"<figure>{_img(_png_b64(Image.open(p).convert('RGB')), p.stem)}<figcaption>{html.escape(p.name)}</figcaption>"
        "</figure>"
        for p in plots
    )
    index = "".join(f'<a href="#case-{html.escape(c.case_id)}">{html.escape(c.case_id)}</a>' for c in shown)
    more = "" if len(shown) == len(by_case) else f"<p class='meta'>showing {len(shown)} of {len(by_case)} cases</p>"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>IBISAgent evaluation</title><style>{_CSS}</style>
<style>{"".join(styles)}</style></head>
<body>
<h1>IBISAgent evaluation</h1>
<p class="meta">benchmark: {html.escape(str(info.get("benchmark")))} ({html.escape(str(info.get("format")))},
{len(by_case)} cases) · tool: {html.escape(str(info.get("tool")))} ·
methods: {html.escape(", ".join(f"{m} = {labels.get(m, m)}" for m in methods))} ·
written {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}</p>
<p class="meta">{html.escape(definitions(info, methods))}</p>
<h2>Overall</h2>{_html_table(summary, "overall")}
<h2>Per modality</h2>{_html_table(summary, "modality")}
<h2>Per target</h2>{_html_table(summary, "target")}
<h2>Plots</h2><div class="plots">{plot_html}</div>
<h2>Cases</h2><div class="index">{index}</div>{more}
{"".join(sections)}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def write_report(
    out_dir: str | Path,
    cases: Sequence[Case],
    rows: Sequence[dict],
    methods: Sequence[str],
    info: dict,
    thumb: int = 256,
    html_cases: int | None = None,
) -> dict[str, Path]:
    """summary.md, summary.csv, the plots and report.html; returns {name: path}."""
    out_dir = Path(out_dir)
    summary = write_summary(out_dir, rows, methods, info)
    plots = write_plots(out_dir, rows, methods, int(info.get("noc_max", 20)))
    page = write_html(out_dir, cases, rows, summary, methods, info, plots, thumb, html_cases)
    return {"summary.md": out_dir / "summary.md", "summary.csv": out_dir / "summary.csv", "report.html": page} | {
        p.name: p for p in plots
    }
