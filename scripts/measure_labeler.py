"""Agreement of the rule labeller (``medvlp_bench.report_labeler``, CheXpert vocabulary) with IU X-ray MeSH tags.

The IU X-ray reports (Open-i, CC BY-NC-ND 4.0) are read at run time from the shared data folder and never
copied. For each finding with a MeSH counterpart the script prints precision, recall, F1 and Cohen's kappa of
"labeller positive" against "MeSH tag present", with uncertain mentions counted as positive (U-ones; the
F1 with U-zeros is printed beside it). The text is findings + impression.

    python scripts/measure_labeler.py [--csv /path/to/indiana_reports.csv] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score, f1_score, precision_score, recall_score

from medvlp_bench.report_labeler import ReportLabeler, to_binary

#: labeller class -> (MeSH main terms, qualifier that must also appear or None)
MESH_MAP: dict[str, tuple[tuple[str, ...], str | None]] = {
    "no_finding": (("normal",), None),
    "enlarged_cardiomediastinum": (("Mediastinum",), "prominent|enlarged|widened"),
    "cardiomegaly": (("Cardiomegaly",), None),
    "lung_opacity": (("Opacity", "Airspace Disease", "Infiltrate"), None),
    "lung_lesion": (("Nodule", "Mass"), None),
    "edema": (("Pulmonary Edema", "Pulmonary Congestion", "Heart Failure"), None),
    "consolidation": (("Consolidation",), None),
    "pneumonia": (("Pneumonia",), None),
    "atelectasis": (("Pulmonary Atelectasis",), None),
    "pneumothorax": (("Pneumothorax", "Hydropneumothorax", "Hemopneumothorax"), None),
    "pleural_effusion": (("Pleural Effusion",), None),
    "pleural_other": (("Thickening",), "pleura"),
    "fracture": (("Fractures, Bone",), None),
    "support_devices": (
        (
            "Catheters, Indwelling",
            "Tube, Inserted",
            "Implanted Medical Device",
            "Medical Device",
            "Stents",
            "Surgical Instruments",
        ),
        None,
    ),
}
#: extra MeSH terms counted as cardiomegaly: "Cardiac Shadow/enlarged"
EXTRA = {"cardiomegaly": (("Cardiac Shadow",), "enlarged")}


def default_csv() -> Path:
    root = Path(os.environ.get("MEDBENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return root / "iu-xray-reports-textonly" / "indiana_reports.csv"


def mesh_targets(mesh: pd.Series, classes: list[str]) -> np.ndarray:
    """[N, C] 1 where a report's MeSH tags contain the class's term (and qualifier); nan for unmapped classes."""
    out = np.full((len(mesh), len(classes)), np.nan, np.float32)
    for c, name in enumerate(classes):
        rules = [r for r in (MESH_MAP.get(name), EXTRA.get(name)) if r]
        if not rules:
            continue
        for i, tags in enumerate(mesh.fillna("").astype(str)):
            out[i, c] = float(any(_tag_matches(t, rules) for t in tags.split(";")))
    return out


def _tag_matches(tag: str, rules: list[tuple[tuple[str, ...], str | None]]) -> bool:
    parts = [p.strip().lower() for p in tag.split("/")]
    for terms, qualifier in rules:
        term_ok = parts[0] in {t.lower() for t in terms}
        if term_ok and (qualifier is None or any(q in parts[1:] for q in qualifier.split("|"))):
            return True
    return False


def measure(csv: Path) -> pd.DataFrame:
    """One row per mapped class: MeSH positives, labeller positives, P/R/F1/kappa (U-ones), F1 (U-zeros)."""
    df = pd.read_csv(csv)
    for col in ("MeSH", "findings", "impression"):
        if col not in df.columns:
            raise KeyError(f"{csv}: expected a column {col!r}; found {list(df.columns)}")
    text = (df["findings"].fillna("") + " " + df["impression"].fillna("")).str.strip()
    keep = text.str.len() > 0
    df, text = df[keep], text[keep]
    labeler = ReportLabeler("chexpert")
    raw = labeler.label_many(text.tolist())
    ones, zeros = to_binary(raw, "ones"), to_binary(raw, "zeros")
    target = mesh_targets(df["MeSH"], labeler.classes)
    rows = []
    for c, name in enumerate(labeler.classes):
        y = target[:, c]
        if np.isnan(y).all():
            continue
        p1, p0 = ones[:, c], zeros[:, c]
        rows.append(
            {
                "finding": name,
                "mesh_pos": int(y.sum()),
                "lab_pos": int(p1.sum()),
                "lab_unc": int((raw[:, c] == -1).sum()),
                "precision": precision_score(y, p1, zero_division=0),
                "recall": recall_score(y, p1, zero_division=0),
                "f1": f1_score(y, p1, zero_division=0),
                "kappa": cohen_kappa_score(y, p1),
                "f1_u0": f1_score(y, p0, zero_division=0),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", type=Path, default=default_csv(), help="indiana_reports.csv")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        print(f"no IU X-ray reports at {args.csv} (set MEDBENCH_SHARED_DATA or pass --csv)", file=sys.stderr)
        return 2
    t0 = time.time()
    table = measure(args.csv)
    n = len(pd.read_csv(args.csv))
    fmt = {c: "{:.3f}".format for c in ("precision", "recall", "f1", "kappa", "f1_u0")}
    if args.markdown:
        print(table.to_markdown(index=False, floatfmt=".3f"))
    else:
        print(table.to_string(index=False, formatters=fmt))
    macro = table[table.finding != "no_finding"][["precision", "recall", "f1", "kappa"]].mean()
    print(
        f"\nmacro over {len(table) - 1} findings (no_finding excluded): "
        + ", ".join(f"{k} {v:.3f}" for k, v in macro.items())
    )
    print(f"{n} reports, {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
