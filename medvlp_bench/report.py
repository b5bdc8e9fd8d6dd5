"""``medbench report``: one self-contained HTML page of the benchmark results, for reading and sharing.

The page holds the leaderboard, label-efficiency curves, bar charts with confidence intervals and paired tests
of each method against a baseline. It is built only from ``results/runs`` (rows) and ``results/predictions``
(paired tests), so it can be regenerated at any time. Figures are embedded as base64 PNGs and the CSS is inline
(no JavaScript, no external URLs): the file opens offline and survives being mailed or attached to a ticket.
Every value shown comes from the rows or from ``stats.compare``, which recomputes it with ``medvlp_bench.metrics``
(the functions the tasks scored the rows with); seed intervals are clipped to each metric's range.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from . import comparison, coverage, results, stats
from .atomic import atomic_write_bytes
from .cli import RESULTS_HELP

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CMP_HEADER = ["task", "protocol", "label fraction", "method", "metric", "method value", "p-value", "test", "seeds",
              "n test"]  # fmt: skip
FIG_KEYS = ["task", "task_version", "metric"]  # one figure family per task (and version and primary metric)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1320px;
 padding:0 16px;color:#1d2330;line-height:1.4}
h1{margin-bottom:4px}h2{border-bottom:2px solid #d8dde6;padding-bottom:4px;margin-top:36px}
h3{margin:22px 0 8px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #d8dde6;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#eef1f6}tr:nth-child(even) td{background:#f8f9fb}
td.num,td.p{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #d8dde6;padding:8px;background:#fff;max-width:100%}
figure img{display:block;max-width:100%;height:auto}figcaption{font-size:13px;color:#555;margin-top:4px}
.note{color:#6a5300;background:#fff7d6;border-left:4px solid #e0b400;padding:4px 10px;margin:6px 0}
.meta td:first-child{font-weight:600}
"""


def _e(x: object) -> str:
    """Escape anything that came from result files (method and task names are free text)."""
    return html.escape(str(x), quote=True)


def _num(x: float, fmt: str = ".3f") -> str:
    return "—" if x is None or not math.isfinite(float(x)) else format(float(x), fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]]) -> str:
    """An HTML table; each cell is (css class, already escaped text)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{t}</td>' for c, t in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts)).strip("_")[:80]


def _label(name: str) -> str:
    return " " + name if name.startswith("_") else name  # matplotlib hides legend labels starting with "_"


def _png(fig: Figure) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _ylabel(metric: str, higher: bool) -> str:
    return f"{metric} ({'higher' if higher else 'lower'} is better)"


def curve_figure(g: pd.DataFrame, title: str, colors: dict[str, object]) -> bytes:
    """Metric against label fraction (log x), one line per method, the seed CI as a band: label efficiency."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    alpha = 0.2 if g["method"].nunique() <= 3 else 0.08  # many overlapping bands turn to mud
    for method, m in g.sort_values("label_fraction").groupby("method", sort=True):
        x = m["label_fraction"].to_numpy(float)
        ax.plot(x, m["mean"], marker="o", color=colors[method], label=_label(str(method)))
        ax.fill_between(x, m["ci95_low"], m["ci95_high"], color=colors[method], alpha=alpha, linewidth=0)
    fracs = sorted(g["label_fraction"].astype(float).unique())
    ax.set_xscale("log")
    ax.set_xticks(fracs, [f"{f:g}" for f in fracs])
    ax.minorticks_off()
    ax.set(xlabel="label fraction", ylabel=_ylabel(g["metric"].iloc[0], bool(g["higher_is_better"].iloc[0])))
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def bar_figure(g: pd.DataFrame, title: str, colors: dict[str, object]) -> bytes:
    """One bar per method in each (protocol, label fraction) group, the seed CI as error bars."""
    import matplotlib.pyplot as plt

    groups = sorted({(p, float(f)) for p, f in zip(g["protocol"], g["label_fraction"])})
    methods = sorted(g["method"].unique())
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(
        figsize=(min(13.0, max(6.2, 0.45 * len(groups) * len(methods) + 2)), 4.0), layout="constrained"
    )
    for i, method in enumerate(methods):
        m = g[g["method"] == method].set_index(["protocol", "label_fraction"])
        rows = [m.loc[k] if k in m.index else None for k in groups]
        mean = np.array([np.nan if r is None else r["mean"] for r in rows], float)
        lo = np.array([np.nan if r is None else r["ci95_low"] for r in rows], float)
        hi = np.array([np.nan if r is None else r["ci95_high"] for r in rows], float)
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]), nan=0.0)
        ax.bar(
            np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width,
            mean,
            width,
            yerr=err,
            capsize=3,
            color=colors[method],
            label=_label(str(method)),
        )
    ax.set_xticks(np.arange(len(groups)), [f"{p}\nlabels {f:g}" for p, f in groups], fontsize=9)
    ax.set_ylabel(_ylabel(g["metric"].iloc[0], bool(g["higher_is_better"].iloc[0])))
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def paired_rows(
    results_dir: Path, lb: pd.DataFrame, baseline: str, level: float, n_boot: int
) -> tuple[list[dict], list[str]]:
    """Each method vs the baseline per (task, protocol, fraction): stats.compare's pooled row, or why it was skipped."""
    done: list[dict] = []
    skipped: list[str] = []
    for (task, protocol, frac, metric), g in lb.groupby(["task", "protocol", "label_fraction", "metric"], sort=True):
        where = f"{task} / {protocol} / labels {frac:g}"
        others = sorted(set(g["method"]) - {baseline})
        if baseline not in set(g["method"]):
            skipped += [f"{where}: baseline {baseline!r} has no result here"] if others else []
            continue
        for method in others:
            try:
                done.append(stats.pooled(results_dir, method, baseline, task, protocol, frac, metric, n_boot, level))
            except stats.COMPARE_ERRORS as e:
                skipped.append(f"{where} / {method}: skipped (predictions missing or unusable): {e}")
    return done, skipped


def left_out_notes(runs_dir: Path) -> list[str]:
    """One line per cell whose macro averages left classes out (no positive or no negative in its test split)."""
    notes = []
    for path in sorted(Path(runs_dir).glob("*.json")):
        try:
            left = json.loads(path.read_text()).get("left_out_classes") or {}
        except (json.JSONDecodeError, AttributeError):
            continue  # load_rows has already reported corrupt files
        if left:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(left.items()))
            notes.append(f"{path.stem}: macro averages leave out {len(left)} class(es) ({why})")
    return notes


def _fail(msg: str) -> int:
    print(f"medbench report: error: {msg}", file=sys.stderr)
    return 2


def main_report(argv: Sequence[str]) -> int:
    """``medbench report [--results DIR] [--out DIR] [--baseline METHOD] [--level 0.95] [--n-boot N] [--suite S]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="medbench report", description="self-contained HTML report of the results")
    ap.add_argument("--results", default=None, help=RESULTS_HELP)
    ap.add_argument("--out", default=None, help="output folder (default: <results>/report)")
    ap.add_argument("--baseline", default="scratch", help="method the paired tests compare against")
    ap.add_argument("--level", type=float, default=0.95, help="confidence level of the paired-test intervals")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for non-AUROC metrics")
    ap.add_argument(
        "--suite",
        default=None,
        help="also the suite's comparison table (each method against its own-encoder scratch and the reference, "
        "from the suite's `comparison:` block), into the page and as comparison.md/.csv "
        "(and comparison_summary.md: one table of the pre-trained methods, the form the README quotes), and the "
        "suite's coverage: the cells done, to run, excluded and not applicable, as coverage.md/.csv",
    )
    args = ap.parse_args(list(argv))
    if not 0 < args.level < 1:
        return _fail(f"--level must be between 0 and 1, got {args.level}")
    res_dir = results.results_dir(args.results)
    runs = res_dir / "runs"
    if not runs.is_dir():
        return _fail(f"no results folder {runs}; run `medbench bench` (or `medbench run`) first")
    try:
        rows = results.load_rows(runs)
    except ValueError as e:
        return _fail(str(e))
    if rows.empty:
        return _fail(f"no result rows in {runs}; run `medbench bench` (or `medbench run`) first")
    extra = ""
    comparison_files: dict[str, bytes] = {}
    if args.suite:
        try:
            plan, scope = comparison.suite_plan(args.suite)
        except ValueError as e:  # ConfigError too: an unknown suite names the valid ones
            return _fail(str(e))
        df = comparison.table(res_dir, plan, scope, level=args.level, n_boot=args.n_boot, rows=rows)
        try:
            cov = suite_coverage(args.suite, res_dir)
        except ValueError as e:  # a bad `exclude:` block, or a cell the configs refuse: named, before any file
            return _fail(f"suite {args.suite}: {e}")
        extra = _comparison_section(df, plan, args.suite, args.level) + _coverage_section(cov, args.suite)
        coverage_note = f"\n{args.suite}: {coverage.totals_line(cov)}; coverage.md lists the cells not run and why.\n"
        comparison_files = {
            "comparison.md": comparison.markdown(df, plan, args.level).encode("utf-8"),
            "comparison_summary.md": (comparison.summary_markdown(df, plan) + coverage_note).encode("utf-8"),
            "comparison.csv": df.to_csv(index=False).encode("utf-8"),
            "coverage.md": coverage.coverage_markdown(cov, args.suite).encode("utf-8"),
            "coverage.csv": cov.to_csv(index=False).encode("utf-8"),
        }
    files = render(rows, res_dir, args.baseline, args.level, args.n_boot, extra)  # everything in memory first
    files |= comparison_files
    out = Path(args.out) if args.out else res_dir / "report"
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    print(f"wrote {out / 'index.html'} ({sum(name.endswith('.png') for name in files)} figures)")
    return 0


def _leaderboard_table(title: str, g: pd.DataFrame) -> str:
    arrow = "higher" if bool(g["higher_is_better"].iloc[0]) else "lower"
    body = [
        [("", _e(results.method_label(r.method, r.method_version, r.learned))), ("", _e(r.protocol)),
         ("num", _e(f"{r.label_fraction:g}")),
         ("num", _num(r.mean) + ("" if math.isnan(r.std) else " ± " + _num(r.std))),
         ("num", "—" if math.isnan(r.ci95_low) else f"[{_num(r.ci95_low)}, {_num(r.ci95_high)}]"),
         ("num", _e(r.n_seeds)), ("", _e(r.impl_source)), ("", results.learned_text(r.learned))]
        for r in g.itertuples()
    ]  # fmt: skip
    header = ["method", "protocol", "label fraction", "mean ± std", "95% CI", "n seeds", "implementation", "learned"]
    return f"<h3>{_e(title)} <small>({arrow} is better)</small></h3>" + _table(header, body)


def _paired_section(done: list[dict], skipped: list[str], baseline: str, level: float) -> str:
    pct = f"{level * 100:g}%"
    body = [
        [("", _e(d["task"])), ("", _e(d["protocol"])), ("num", _e(f"{d['label_fraction']:g}")),
         ("", _e(d["method_a"])), ("", _e(d["metric"])), ("num", _num(d["value_a"])), ("num", _num(d["value_b"])),
         ("num", _num(d["diff"], "+.3f")), ("num", f"[{_num(d['ci_low'], '+.3f')}, {_num(d['ci_high'], '+.3f')}]"),
         ("p", _num(d["p_value"], ".3g")), ("", _e(d["test"])), ("num", _e(d["n_seeds"])), ("num", _e(d["n_test"]))]
        for d in done
    ]  # fmt: skip
    header = [*CMP_HEADER[:6], f"{baseline} value", "difference", f"{pct} CI", *CMP_HEADER[6:]]
    intro = (
        f"<p>Each method minus the baseline <b>{_e(baseline)}</b> on the same test samples, pooled over the seeds "
        f"both have (DeLong for AUROC, paired bootstrap otherwise; {pct} interval; p-values are not corrected "
        "for multiple comparisons). For lower-is-better metrics a negative difference favours the method.</p>"
    )
    table = _table(header, body) if body else '<p class="note">No paired comparison could be computed.</p>'
    return intro + table + "".join(f'<p class="note">{_e(why)}</p>' for why in skipped)


def suite_coverage(suite: str, res_dir: Path) -> pd.DataFrame:
    """The suite's grid planned against ``res_dir`` (``bench.plan``, no work) and counted by ``coverage``."""
    from .bench import compose_bench, plan
    from .config import quoted

    cfg, passthrough = compose_bench([f"suite={suite}", f"paths.results_dir={quoted(res_dir.resolve())}"])
    return coverage.coverage(plan(cfg, passthrough))


def _coverage_section(cov: pd.DataFrame, suite: str) -> str:
    """Which cells of the suite are done, and why the others are not (``coverage.md`` as HTML)."""
    open_, cols = coverage.open_pairs(cov)
    body = [[("", _e(r["task"])), ("", _e(r["method"])), *[("num", _e(r[c])) for c in cols], ("", _e(r["why"]))]
            for r in open_.to_dict("records")]  # fmt: skip
    out = f'<h2 id="coverage">Coverage of suite {_e(suite)}</h2><p>{_e(coverage.totals_line(cov))}.'
    if not body:
        return out + " Every cell is done or not applicable.</p>"
    table = _table(["task", "method", *cols, "why not run"], body)
    return out + " The (task, method) pairs with cells not done:</p>" + table


def _comparison_section(df: pd.DataFrame, plan: comparison.ComparisonPlan, suite: str, level: float) -> str:
    """The suite's comparison table (``comparison.table``): one HTML table per task."""

    def diff(r: object, suffix: str) -> tuple[str, str]:
        text = comparison.difference_text(r, suffix)
        return ("num", _e(text)) if text else ("", "")

    pct = f"{level * 100:g}%"
    ref = plan.reference or "reference"
    header = ["protocol", "labels", "method", "mean ± std", "seeds", "own-encoder scratch", f"Δ vs it [{pct} CI]",
              f"Δ vs {ref} [{pct} CI]", "learned", "note"]  # fmt: skip
    out = [f'<h2 id="comparison">0. Which method helps (suite {_e(suite)})</h2>'
           "<p>Each method minus its own untrained encoder and minus the reference, on the same test samples, "
           "pooled over the seeds both have (DeLong for AUROC, paired bootstrap otherwise; p-values uncorrected). "
           "The seed count is shown beside a difference that pools fewer seeds than the method has.</p>"]  # fmt: skip
    for (task, metric, higher), g in df.groupby(["task", "metric", "higher_is_better"], sort=True):
        body = [
            [("", _e(r.protocol)), ("num", _e(f"{r.label_fraction:g}")),
             ("", _e(results.method_label(r.method, r.method_version, None))),
             ("num", _num(r.mean) + ("" if math.isnan(r.std) else " ± " + _num(r.std))), ("num", _e(r.n_seeds)),
             ("", _e(r.twin if isinstance(r.twin, str) else "")), diff(r, "twin"), diff(r, "ref"),
             ("", results.learned_text(r.learned)), ("", _e(r.note))]
            for r in g.itertuples()
        ]  # fmt: skip
        better = "higher" if bool(higher) else "lower"
        out.append(f"<h3>{_e(task)} · {_e(metric)} <small>({better} is better)</small></h3>" + _table(header, body))
    return "".join(out)


def render(
    rows: pd.DataFrame, res_dir: Path, baseline: str, level: float, n_boot: int = 2000, extra: str = ""
) -> dict[str, bytes]:
    """The report's files (``index.html``, ``leaderboard.md``, PNGs) as bytes, nothing written yet. ``extra``:
    HTML put first on the page (the suite's comparison table)."""
    import matplotlib

    matplotlib.use("Agg")
    lb = results.build_leaderboard(rows)
    prim = lb[lb["primary"].astype(bool)].copy()
    cmap = matplotlib.colormaps["tab10" if prim["method"].nunique() <= 10 else "tab20"]
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(sorted(prim["method"].unique()))}
    files: dict[str, bytes] = {}
    figs: dict[str, list[str]] = {"curve": [], "bar": [], "note": []}

    def add(kind: str, stem: str, data: bytes, caption: str) -> None:
        name = f"fig{len(files) + 1:02d}-{kind}-{stem}.png"
        files[name] = data
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        cap = f"{_e(caption)} ({_e(name)})"
        figs[kind].append(f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{cap}</figcaption></figure>')

    tables = [] if len(prim) else ['<p class="note">No row is marked as a primary metric; nothing to show.</p>']
    with matplotlib.rc_context({"text.parse_math": False}):  # a "$" in a name must not start mathtext
        for (task, version, metric), g in prim.groupby(FIG_KEYS, sort=True):
            title = f"{task} (v{version}) · {metric}"
            tables.append(_leaderboard_table(title, g))
            for protocol, gp in g.groupby("protocol", sort=True):
                if gp["label_fraction"].nunique() < 2:
                    figs["note"].append(f"{task} / {protocol}: one label fraction only, no curve")
                    continue
                fig = curve_figure(gp, f"{title} · {protocol}", colors)
                add("curve", _slug(task, protocol), fig, f"label efficiency: {task}, {protocol}")
            add("bar", _slug(task), bar_figure(g, title, colors), f"{task}: mean over seeds with 95% CI")
    paired = _paired_section(*paired_rows(res_dir, prim, baseline, level, n_boot), baseline, level)
    tables += [f'<p class="note">{_e(n)}</p>' for n in left_out_notes(res_dir / "runs")]
    files["leaderboard.md"] = results.leaderboard_markdown(lb).encode("utf-8")
    files["index.html"] = _page(rows, res_dir, tables, figs, paired, extra).encode("utf-8")
    return files


def _page(
    rows: pd.DataFrame, res_dir: Path, tables: list[str], figs: dict[str, list[str]], paired: str, extra: str = ""
) -> str:
    """Assemble the HTML document; provenance first, so a reader knows what code and data produced it."""
    n_cells = len(rows.drop_duplicates(["task", "method", "protocol", "label_fraction", "seed"]))
    meta = [
        ("results folder", str(res_dir.resolve())),
        ("generated", datetime.now(UTC).isoformat(timespec="seconds")),
        ("code version(s)", ", ".join(sorted(rows["code_version"].dropna().astype(str).unique())) or "—"),
        ("cells / rows", f"{n_cells} cells, {len(rows)} metric rows"),
        ("runs dated", f"{rows['date'].min()} … {rows['date'].max()}"),
        ("device(s)", ", ".join(sorted(rows["device"].dropna().astype(str).unique())) or "—"),
        ("methods", ", ".join(sorted(rows["method"].astype(str).unique()))),
        ("tasks", ", ".join(sorted(rows["task"].astype(str).unique()))),
    ]
    meta_html = "<table class='meta'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta)
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in figs["note"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>medvlp-bench report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>
<h1>medvlp-bench report</h1>
{meta_html}</table>
{extra}
<h2 id="leaderboard">1. Leaderboard (primary metric per task)</h2>
<p>Mean ± standard deviation over seeds; the 95% CI is Student-t over seeds (seed variance, not test-set noise),
clipped to the metric's range (e.g. [0, 1] for AUROC and Dice).</p>
{"".join(tables)}
<h2 id="curves">2. Label efficiency</h2>
<p>Primary metric against the fraction of labelled training data (log scale); the band is the 95% CI over seeds.</p>
{notes}<div class="grid">{"".join(figs["curve"])}</div>
<h2 id="bars">3. Per-task comparison</h2>
<div class="grid">{"".join(figs["bar"])}</div>
<h2 id="paired">4. Paired comparisons</h2>
{paired}
</body></html>
"""


if __name__ == "__main__":
    raise SystemExit(main_report(sys.argv[1:]))
