"""Stage 'report': one page that shows what the pipeline did and whether RIPT helped.

Per-task held-out success before (SFT) and after RIPT with Wilson 95 % intervals (table + bar
chart), the RIPT curves, the stage-0/1 loss curves (with validation success when a stage
ran validation rollouts), the config and each stage's wall time.
The success numbers are read from the per-policy tables `eval/{sft,ript}/table.csv`
(`ript.results.aggregate`), so the page, `summary.json` and the tables cannot disagree.
Writes `index.html` (self-contained apart from the PNGs beside it; images scale to the page),
`report.md` and `summary.json`.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
from pathlib import Path
from typing import NamedTuple

import yaml

from ript.config import from_dict
from ript.results import read_table
from ript.settings import ReportConfig
from ript.stage import load_block
from ript.tracking import read_jsonl
from ript.utils import atomic_path, write_json


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The keys of a pooled ('mean') row that summary.json keeps, as before the tables were read.
POOLED_KEYS = ("success_rate", "wilson_low", "wilson_high", "episodes", "successes", "errors")
# Widest figure (inches): at the report's dpi it still fits the page; CSS scales what is wider.
MAX_FIG_WIDTH = 11.0


def load_table(path) -> tuple[dict[str, dict], dict]:
    """A policy's table -> ({task: row}, pooled) where pooled is the 'mean' row: the mean of
    per-task rates with a Wilson interval over all scored episodes (`ript.results.aggregate`)."""
    rows, mean = read_table(path)
    per_task = {r["task"]: r for r in rows.to_dict("records")}  # plain Python numbers (JSON)
    return per_task, {k: mean[k] for k in POOLED_KEYS}


def error_warning(sft: dict[str, dict], ript: dict[str, dict] | None) -> str | None:
    """One line naming the evaluations whose episodes hit infrastructure errors, if any."""
    bad = [f"{name} {t}: {s['errors']} of {s['episodes']}"
           for name, res in (("SFT", sft), ("RIPT", ript or {}))
           for t, s in res.items() if s.get("errors", 0)]
    if not bad:
        return None
    return ("Warning: some evaluation episodes hit infrastructure errors and were not scored "
            "(success is over the episodes that ran): " + "; ".join(bad) + ".")


def bar_chart(sft: dict, ript: dict | None, pooled: dict, out: Path, dpi: int,
              label: str = "SFT") -> None:
    """`pooled`: {"SFT": mean row, "RIPT": mean row}, the last pair of bars. Without RIPT (a
    VLA checkpoint evaluated as released) one bar per task."""
    plt = _plt()
    tasks = list(sft)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(tasks) + 2), 3.6))
    policies = [("SFT", sft, "#8c8c8c")] + ([("RIPT", ript, "#d62728")] if ript else [])
    names = {"SFT": label}
    width = 0.76 / len(policies)
    for i, (name, res, color) in enumerate(policies):
        xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(tasks) + 1)]
        vals = [res[t]["success_rate"] for t in tasks] + [pooled[name]["success_rate"]]
        lows = [res[t]["wilson_low"] for t in tasks] + [pooled[name]["wilson_low"]]
        highs = [res[t]["wilson_high"] for t in tasks] + [pooled[name]["wilson_high"]]
        err = [[v - lo for v, lo in zip(vals, lows)], [hi - v for v, hi in zip(vals, highs)]]
        ax.bar(xs, [100 * v for v in vals], width, yerr=[[100 * e for e in err[0]],
                                                         [100 * e for e in err[1]]],
               label=names.get(name, name), color=color, capsize=3)
    ax.set_xticks(range(len(tasks) + 1), [t.removesuffix("-v3") for t in tasks] + ["mean"],
                  rotation=20, ha="right")
    ax.set_ylabel("held-out success (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left")
    ax.set_title("Success before and after RIPT (95 % Wilson intervals)" if ript else
                 "Held-out success (95 % Wilson intervals)")
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _panels_size(n: int) -> tuple[float, float]:
    """A row of n panels no wider than MAX_FIG_WIDTH (4.2 in each made three panels 1386 px at
    110 dpi, wider than the page)."""
    return min(3.7 * n, MAX_FIG_WIDTH), 3.2


def curves(rows: list[dict], panels: list[tuple[str, list[str]]], out: Path, dpi: int,
           xlabel: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=_panels_size(len(panels)), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 40 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def stage_curves(stage_rows: dict[str, list[dict]], out: Path, dpi: int) -> None:
    """One panel per supervised stage: its loss, and beside it on a right-hand axis the
    validation success when the stage ran validation rollouts (`train.eval_every`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(stage_rows), figsize=_panels_size(len(stage_rows)),
                             squeeze=False)
    for ax, (name, rows) in zip(axes[0], stage_rows.items()):
        # QueST: reconstruction L1 / token cross-entropy; the VLA stages log `loss` (L1, NLL)
        key = ("recon_l1" if name == "autoencoder"
               else next((k for k in ("ce", "loss") if any(k in r for r in rows)), "loss"))
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        val = [(r["step"], r["val_success"]) for r in rows if "val_success" in r]
        if val:
            right = ax.twinx()
            right.plot(*zip(*val), color="#d62728", marker="o", ms=3, label="val_success")
            right.set_ylim(-0.02, 1.02)
            right.set_ylabel("validation success")
            chosen = [r["selected_step"] for r in rows if "selected_step" in r]
            if chosen:  # select: best_validation
                right.axvline(chosen[-1], color="#d62728", ls=":", lw=1, label="selected")
            lines = ax.get_legend_handles_labels()
            more = right.get_legend_handles_labels()
            right.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
        ax.set_title(f"{name} loss" + (" and validation" if val else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


class JobTime(NamedTuple):
    job: str
    seconds: float
    end: float  # Unix time the job ended (its benchmark file's mtime)


def job_times(bench_dir: Path) -> list[JobTime]:
    """Each job's run time from Snakemake's benchmark files (the last row: the last repeat)."""
    out = []
    for f in sorted(bench_dir.rglob("*.tsv")):
        with open(f) as h:
            rows = list(csv.DictReader(h, delimiter="\t"))
        if rows:
            out.append(JobTime(str(f.relative_to(bench_dir).with_suffix("")),
                               float(rows[-1]["s"]), f.stat().st_mtime))
    return out


def wall_clock(times: list[JobTime]) -> float | None:
    """The pipeline's wall clock: from the earliest job start to the latest job end.

    A benchmark file holds a job's duration but no timestamps; Snakemake writes it when the job
    ends, so its mtime is the job's end and mtime - seconds its start. The report's own file is
    left out: it is written after this page, so what is there is a previous report's. The span
    covers every job whose benchmark is present, so results built over several Snakemake
    invocations include the time between them, and copying the results without their mtimes
    (cp without -p) makes it meaningless. None without any job.
    """
    jobs = [t for t in times if t.job != "report"]
    if not jobs:
        return None
    return max(t.end for t in jobs) - min(t.end - t.seconds for t in jobs)


def build(cfg: ReportConfig, *, sft_table, ript_table, ript_metrics, stage_metrics,
          bench_dir, full_config, out_dir: Path) -> dict:
    """Without `ript_table` (a VLA checkpoint evaluated as released, no RIPT yet) the page shows
    the one policy; without stage metrics (no supervised stage ran) it has no loss figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sft, ps = load_table(sft_table)
    ript, pr = load_table(ript_table) if ript_table else (None, None)
    if ript is not None and set(sft) != set(ript):
        raise ValueError(f"SFT and RIPT were evaluated on different tasks: {sorted(sft)} vs "
                         f"{sorted(ript)}")
    policy = full_config.get("policy") or {}
    family = policy.get("family", "quest")
    trained_here = family == "quest" or policy.get("checkpoint") == "scratch"
    label = "SFT" if trained_here else f"{family} checkpoint"
    bar_chart(sft, ript, {"SFT": ps, "RIPT": pr}, out_dir / "success.png", cfg.dpi, label)
    if ript_metrics:
        curves(read_jsonl(ript_metrics),
               [("success", ["train_success", "eval_success"]),
                ("groups per iteration", ["groups_kept", "groups_rejected"]),
                ("PPO", ["clip_frac", "ratio_mean"])],
               out_dir / "ript_curves.png", cfg.dpi, "RIPT iteration")
    stage_rows = {Path(p).parent.name: read_jsonl(p) for p in stage_metrics or []}
    if stage_rows:
        stage_curves(stage_rows, out_dir / "sft_losses.png", cfg.dpi)
    times = job_times(Path(bench_dir))
    lift = 100 * (pr["success_rate"] - ps["success_rate"]) if ript else None
    summary = {"sft": ps, "ript": pr, "lift_points": lift,
               "tasks": {t: {"sft": sft[t]["success_rate"],
                             "ript": ript[t]["success_rate"] if ript else None} for t in sft},
               "wall_seconds": {t.job: t.seconds for t in times},
               # the jobs' times added up (what they cost together), not the time the pipeline took
               "total_wall_seconds": sum(t.seconds for t in times),
               "wall_clock_seconds": wall_clock(times)}
    write_json(out_dir / "summary.json", summary)
    _write_pages(cfg, out_dir, sft, ript, ps, pr, summary, times, full_config,
                 curves=bool(ript_metrics), losses=bool(stage_rows), label=label)
    return summary


def _fmt(s: dict) -> str:
    return (f"{100 * s['success_rate']:.1f} % [{100 * s['wilson_low']:.0f}, "
            f"{100 * s['wilson_high']:.0f}]")


def _clock_text(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f}"


# Images and tables fit the page at any window width: a figure wider than the column is scaled
# down (click it for full size); long cells and config lines wrap instead of overflowing.
CSS = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}
img{max-width:100%;height:auto}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;overflow-wrap:anywhere}
td:first-child,th:first-child{text-align:left}
pre{white-space:pre-wrap;overflow-wrap:anywhere}"""


def _write_pages(cfg, out_dir, sft, ript, ps, pr, summary, times, full_config, *,
                 curves: bool = True, losses: bool = True, label: str = "SFT") -> None:
    if ript:
        header = ["task", "SFT [95 % CI]", "RIPT [95 % CI]", "Δ (points)", "episodes",
                  "errors (SFT / RIPT)"]
        rows = [(t, _fmt(sft[t]), _fmt(ript[t]),
                 f"{100 * (ript[t]['success_rate'] - sft[t]['success_rate']):+.1f}",
                 sft[t]["episodes"], f"{sft[t].get('errors', 0)} / {ript[t].get('errors', 0)}")
                for t in sft]
        rows.append(("mean", _fmt(ps), _fmt(pr), f"{summary['lift_points']:+.1f}",
                     ps["episodes"], f"{ps['errors']} / {pr['errors']}"))
        headline = (f"Held-out success: SFT {100 * ps['success_rate']:.1f} % → RIPT "
                    f"{100 * pr['success_rate']:.1f} % ({summary['lift_points']:+.1f} points).")
    else:
        header = ["task", "success [95 % CI]", "episodes", "errors"]
        rows = [(t, _fmt(sft[t]), sft[t]["episodes"], sft[t].get("errors", 0)) for t in sft]
        rows.append(("mean", _fmt(ps), ps["episodes"], ps["errors"]))
        headline = f"Held-out success of the {label}: {100 * ps['success_rate']:.1f} %."
    totals = [("total (sum of the job times)", f"{summary['total_wall_seconds']:.1f}"),
              ("wall clock (first job start to last job end)",
               _clock_text(summary["wall_clock_seconds"]))]
    warning = error_warning(sft, ript)
    sections = ([("RIPT", "ript_curves.png", "RIPT curves")] if curves else []) + \
        ([("Supervised stages", "sft_losses.png", "stage losses")] if losses else [])
    md = [f"# {cfg.title}", "", *([f"**{warning}**", ""] if warning else []), headline, "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += [f"| {' | '.join(str(c) for c in r)} |" for r in rows]
    md += ["", "![success](success.png)", ""]
    for title, src, alt in sections:
        md += [f"## {title}", "", f"![{alt}]({src})", ""]
    md += ["## Wall time", "", "| job | seconds |", "|---|---|"]
    md += [f"| {t.job} | {t.seconds:.1f} |" for t in times]
    md += [f"| **{label}** | {value} |" for label, value in totals]
    md += ["", "## Config", "", "```yaml", yaml.safe_dump(full_config, sort_keys=False).rstrip(),
           "```", ""]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(md))
    esc = html.escape
    table = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>"
                    for r in rows)
    warning_html = (f'<p style="color:#b00;font-weight:bold">{esc(warning)}</p>'
                    if warning else "")
    times_html = "".join(f"<tr><td>{esc(t.job)}</td><td>{t.seconds:.1f}</td></tr>"
                         for t in times)
    times_html += "".join(f"<tr><td><b>{esc(label)}</b></td><td>{value}</td></tr>"
                          for label, value in totals)

    def figure(src: str, alt: str) -> str:
        # Embedded: the page is one self-contained file, also inside `snakemake --report`'s
        # zip, which puts every output in a folder of its own (a relative src would break).
        data = base64.b64encode((out_dir / src).read_bytes()).decode()
        return (f'<p><a href="{src}"><img src="data:image/png;base64,{data}" '
                f'alt="{alt}"></a></p>')

    head_html = "".join(f"<th>{esc(h)}</th>" for h in header)
    sections_html = "\n".join(f"<h2>{esc(title)}</h2>{figure(src, alt)}"
                              for title, src, alt in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(cfg.title)}</title>
<style>{CSS}</style>
</head><body><h1>{esc(cfg.title)}</h1>
{warning_html}
<p>{esc(headline)}</p>
<div class="scroll"><table><tr>{head_html}</tr>{table}</table></div>
{figure("success.png", "success per task")}
{sections_html}
<h2>Wall time</h2><div class="scroll"><table><tr><th>job</th><th>seconds</th></tr>{times_html}
</table></div>
<h2>Config</h2><pre>{esc(yaml.safe_dump(full_config, sort_keys=False))}</pre></body></html>
"""
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(page)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True, help="the `report` block (JSON or @file)")
    p.add_argument("--full-config", required=True, help="the whole experiment config (JSON)")
    p.add_argument("--sft-table", required=True, help="the SFT policy's table.csv")
    p.add_argument("--ript-table", help="the RIPT policy's table.csv (absent: no RIPT ran)")
    p.add_argument("--ript-metrics")
    p.add_argument("--stage-metrics", nargs="*", default=[])
    p.add_argument("--benchmarks", required=True, help="Snakemake benchmark folder")
    p.add_argument("--out-dir", required=True)
    a = p.parse_args(argv)
    cfg = from_dict(ReportConfig, load_block(a.config), "report")
    summary = build(cfg, sft_table=a.sft_table, ript_table=a.ript_table,
                    ript_metrics=a.ript_metrics, stage_metrics=a.stage_metrics,
                    bench_dir=a.benchmarks,
                    full_config=load_block(a.full_config), out_dir=Path(a.out_dir))
    print(json.dumps({k: summary[k] for k in ("lift_points", "total_wall_seconds",
                                              "wall_clock_seconds")}))


if __name__ == "__main__":
    main()
