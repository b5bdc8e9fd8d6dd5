"""The suite comparison table (``medvlp_bench.comparison``): each method against its own twin and the reference.

Results folders are written with ``test_report.write_results`` (the project's own writers), with three methods
whose scores separate the classes to different degrees, so the signs of the paired differences are known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report import FRACTIONS, TASK, write_results

from medvlp_bench import comparison, coverage, stats
from medvlp_bench.comparison import ComparisonPlan, SuiteScope
from medvlp_bench.report import main_report

# noise of each method's scores: lower separates better (good > reference > twin floor)
NOISE = {"good": 0.4, "clip": 0.8, "scratch_big": 2.0, "scratch": 1.0}
PLAN = ComparisonPlan(reference="clip", twin="scratch", twins={"good": "scratch_big"})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_results(tmp_path_factory.mktemp("cmp"), NOISE)


def test_each_method_is_compared_with_its_own_twin_and_the_reference(folder: Path) -> None:
    scope = SuiteScope(["scratch", "scratch_big", "clip", "good"], [TASK])
    df = comparison.table(folder, PLAN, scope, n_boot=200)
    assert len(df) == len(NOISE) * len(FRACTIONS)
    for frac in FRACTIONS:
        g = df[df["label_fraction"] == frac].set_index("method")
        assert list(g.index) == ["scratch", "scratch_big", "clip", "good"]  # the suite's order
        assert g.loc["good", "twin"] == "scratch_big" and g.loc["clip", "twin"] == "scratch"
        assert g.loc["good", "reference"] == "clip" and pd.isna(g.loc["clip", "reference"])  # not against itself
        for baseline in ("scratch", "scratch_big"):  # floors carry no differences of their own
            assert pd.isna(g.loc[baseline, "diff_twin"]) and pd.isna(g.loc[baseline, "diff_ref"])
        # the numbers are stats.compare's pooled row, the same as `medbench compare good scratch_big`
        ref = stats.compare(folder, "good", "scratch_big", TASK, "linear", frac, metric="auroc")
        pooled = ref[ref["seed"] == "pooled"].iloc[0]
        assert g.loc["good", "diff_twin"] == pytest.approx(pooled["diff"])
        assert g.loc["good", "p_twin"] == pytest.approx(pooled["p_value"])
        assert g.loc["good", "seeds_twin"] == 3
        assert g.loc["good", "diff_twin"] > 0 and g.loc["good", "diff_ref"] > 0
        assert g.loc["good", "diff_twin"] > g.loc["good", "diff_ref"]  # the twin is the weaker floor here


def test_a_missing_baseline_is_named_not_hidden(tmp_path: Path) -> None:
    write_results(tmp_path, {"good": 0.4, "scratch": 1.0})
    df = comparison.table(tmp_path, PLAN, None, n_boot=100)
    row = df[(df["method"] == "good")].iloc[0]
    assert np.isnan(row["diff_twin"]) and np.isnan(row["diff_ref"])
    assert "no scratch_big result here" in row["note"] and "no clip result here" in row["note"]
    md = comparison.markdown(df, PLAN)
    assert "no scratch_big result here" in md


def test_plan_from_a_suite_block_refuses_bad_keys_and_names() -> None:
    plan = ComparisonPlan.from_config({"reference": None, "twins": {"gtgm": "scratch_swin"}}, "suite x")
    assert plan.reference is None and plan.twin_of("gtgm") == "scratch_swin" and plan.twin_of("clip") == "scratch"
    bad = [
        ({"twn": "scratch"}, r"suite x: comparison has unknown keys \['twn'\]; allowed"),
        ({"twins": ["scratch_swin"]}, r"suite x: comparison.twins must map a method to its twin"),
        ({"twin": None}, r"suite x: comparison.twin must be a method name, got None"),
        ({"twins": {"gtgm": "scratch_swn"}}, r"suite x: comparison names \['scratch_swn'\], which the suite does not"),
    ]
    for block, message in bad:
        with pytest.raises(ValueError, match=message):
            ComparisonPlan.from_config(block, "suite x", ["scratch", "scratch_swin", "clip", "gtgm"])


def test_a_difference_over_fewer_seeds_says_so_and_mixed_versions_are_named(tmp_path: Path) -> None:
    write_results(tmp_path, {"good": 0.4, "clip": 0.8})
    write_results(tmp_path, {"scratch_big": 2.0}, seeds=(0,))
    df = comparison.table(tmp_path, PLAN, None, n_boot=100)
    row = df[(df["method"] == "good")].iloc[0]
    assert row["seeds_twin"] == 1 and row["seeds_ref"] == 3
    assert "(1 of 3 seeds)" in comparison.difference_text(row_tuple(row), "twin")
    assert "seeds)" not in comparison.difference_text(row_tuple(row), "ref")
    runs = sorted((tmp_path / "runs").glob(f"{TASK}__good__*__s2.json"))
    for path in runs:  # seed 2 re-run at version 2 mid-suite: two leaderboard lines, one set of prediction files
        path.write_text(path.read_text().replace('"method_version": 1', '"method_version": 2'))
    df = comparison.table(tmp_path, PLAN, None, n_boot=100)
    good = df[df["method"] == "good"]
    assert len(good) == 2 * len(FRACTIONS) and all("several versions" in n for n in good["note"])


def row_tuple(row: pd.Series):
    return next(pd.DataFrame([row]).itertuples())


@pytest.mark.parametrize("suite", ["methods_small", "methods_cpu"])
def test_each_twin_is_its_methods_encoder_untrained(suite: str) -> None:
    """The table's premise: at the suite's settings a method and its twin build the same image encoder."""
    from medvlp_bench.config import compose, tiny_overrides

    plan, scope = comparison.suite_plan(suite)
    tiny = bool(compose("bench", [f"suite={suite}"]).suite.get("tiny"))
    for method in scope.methods:
        if method in plan.baselines():
            continue
        twin = plan.twin_of(method)
        encoders = []
        for m in (method, twin):
            ov = [f"method={m}", "task=phantom_mri_cls" if method == "brainmvp" else "task=phantom_ct_cls"]
            cfg = compose("run", ov + (list(tiny_overrides(m)) if tiny else []))
            enc = dict(cfg.method.model.image_encoder)
            encoders.append({k: v for k, v in enc.items() if k not in ("spatial_dims", "in_channels")})
        assert encoders[0] == encoders[1], f"{suite}: {method} and its twin {twin} differ: {encoders}"


#: a user suite (MEDBENCH_CONFIG_PATH) over the folder's task, with a zero-shot task and a fourth seed that
#: have no results: its coverage must say which cells are missing and why
SMALL_SUITE = f"""
methods: [scratch, clip]
tasks: [{TASK}, phantom_cxr_zeroshot]
seeds: [0, 1, 2, 3]
label_fractions: [0.1, 1.0]
protocols: null
tiny: false
exclude:
  - tasks: [phantom_cxr_zeroshot]
    why: not in this test's budget
comparison: {{reference: clip, twin: scratch}}
"""


def test_report_writes_the_suite_table_and_its_coverage(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = tmp_path / "user"
    (user / "suite").mkdir(parents=True)
    (user / "suite" / "cmp_small.yaml").write_text(SMALL_SUITE)
    monkeypatch.setenv("MEDBENCH_CONFIG_PATH", str(user))
    out = tmp_path / "rep"
    assert main_report(["--results", str(folder), "--suite", "cmp_small", "--out", str(out), "--n-boot", "100"]) == 0
    md = (out / "comparison.md").read_text()
    csv = pd.read_csv(out / "comparison.csv")
    assert set(csv["method"]) == {"clip", "scratch"}  # the suite's methods only: good, scratch_big are not in it
    assert f"### {TASK} (auroc, higher is better)" in md and "| linear | 0.1 | clip | " in md
    summary = (out / "comparison_summary.md").read_text().splitlines()
    clip = [line for line in summary if "| clip |" in line]
    assert summary[0].startswith("| task (metric) | labels | method |") and len(clip) == len(FRACTIONS)
    assert not any("| scratch |" in line for line in summary)  # the floor is quoted in clip's row, not a row
    lb = csv.set_index(["method", "label_fraction"])
    twin_mean, diff = lb.loc[("scratch", 0.1), "mean"], lb.loc[("clip", 0.1), "diff_twin"]
    assert any("| 10% | clip |" in line and f"`scratch` {twin_mean:.3f}; {diff:+.3f} [" in line for line in clip)
    # coverage: per method 8 classification cells (4 seeds x 2 fractions), 6 with results at some version (done
    # or stale: the folder's rows carry version 1), 2 to run; clip's zero-shot cells excluded, scratch's n/a
    cov = pd.read_csv(out / "coverage.csv").set_index(["task", "method"])
    for method in ("scratch", "clip"):
        got = cov.loc[(TASK, method)]
        assert (got["planned"], got["done"] + got["stale"], got["to run"]) == (8, 6, 2)
    assert (cov.loc[("phantom_cxr_zeroshot", "clip"), ["excluded", "why"]] == [4, "not in this test's budget"]).all()
    assert cov.loc[("phantom_cxr_zeroshot", "scratch"), "not applicable"] == 4
    assert (
        summary[-1]
        == "cmp_small: 24 cells: "
        + ", ".join(f"{int(cov[s].sum())} {s}" for s in coverage.COUNTS if cov[s].sum())
        + "; coverage.md lists the cells not run and why."
    )
    cov_md = (out / "coverage.md").read_text()
    assert "| phantom_cxr_zeroshot | clip |" in cov_md and "not in this test's budget" in cov_md
    assert "| phantom_cxr_zeroshot | scratch |" not in cov_md  # nothing to run there: complete, counted in the header
    assert "1 of 4 (task, method) pairs are complete (every cell done or not applicable)" in cov_md
    page = (out / "index.html").read_text()
    assert 'id="comparison"' in page and "higher is better" in page and "Δ vs clip [95% CI]" in page
    assert 'id="coverage"' in page and "not in this test&#x27;s budget" in page


def test_report_names_an_unknown_suite(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_report(["--results", str(folder), "--suite", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "methods_small" in err
