"""MIMIC-CXR-JPG 2.x image-report pairs for pre-training: JPGs, report sections, the official split.

Images: ``files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg``. Reports come from MIMIC-CXR
(``mimic-cxr-reports.zip``) as ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` under ``reports_dir`` (default: the root).
The report is the ``sections`` found (default FINDINGS and IMPRESSION, as MGCA); a study with none of them has
an empty report, which is an error or a counted skip. Views default to frontal (PA, AP) from the metadata CSV.
Labels are the CheXpert labeller's 14 observations (``uncertain``: ones or zeros), for probes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, first_existing, inside, read_table
from .chexpert import OBSERVATIONS

INFO = DatasetInfo(
    key="mimic_cxr",
    title="MIMIC-CXR-JPG 2.0.0/2.1.0 (+ MIMIC-CXR reports)",
    kind="2D chest X-ray (JPEG) + free-text reports: pre-training corpus, retrieval",
    layout=(
        "  mimic-cxr-2.0.0-split.csv[.gz]      dicom_id,study_id,subject_id,split (train/validate/test)\n"
        "  mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id,subject_id,study_id,...,ViewPosition,...\n"
        "  mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id,study_id,<14 observations>\n"
        "  files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg\n"
        "  files/pXX/pXXXXXXXX/sXXXXXXXX.txt   (reports, from MIMIC-CXR's mimic-cxr-reports.zip; or reports_dir)"
    ),
    licence="PhysioNet Credentialed Health Data License 1.5.0 (credentialed access, DUA)",
    url="https://physionet.org/content/mimic-cxr-jpg/",
    reports=True,
)
#: labeller vocabulary of the reports: the 14 CheXpert observations (medvlp_bench.report_labeler)
REPORT_VOCABULARY = "chexpert"
SPLITS = {"train": "train", "validate": "val", "test": "test"}
_HEADING = re.compile(r"^\s*([A-Z][A-Z /&()-]+):", re.MULTILINE)


def report_sections(text: str) -> dict[str, str]:
    """Upper-case ``HEADING:`` sections of a report, keyed by the lower-case heading, whitespace collapsed."""
    marks = list(_HEADING.finditer(text))
    out = {}
    for m, nxt in zip(marks, [*marks[1:], None]):
        body = text[m.end() : nxt.start() if nxt else len(text)]
        out[m.group(1).strip().lower()] = " ".join(body.split())
    return out


class MIMICCXR(AdapterDataModule):
    """MIMIC-CXR-JPG images with their report's sections; one row per image (frontal by default)."""

    info = INFO

    def __init__(
        self,
        root: str,
        *,
        reports_dir: str | None = None,
        sections: list[str] | tuple[str, ...] = ("findings", "impression"),
        views: list[str] | tuple[str, ...] | None = ("PA", "AP"),
        uncertain: str = "ones",
        **kw: Any,
    ) -> None:
        if uncertain not in ("ones", "zeros"):
            raise ValueError(f"mimic_cxr: uncertain must be ones or zeros, got {uncertain!r}")
        super().__init__(root, task_type="multilabel", class_names=OBSERVATIONS, **kw)
        self.reports_dir, self.sections = reports_dir, [s.lower() for s in sections]
        self.views, self.uncertain = list(views) if views else None, uncertain

    def scan(self, root: Path) -> pd.DataFrame:
        def table(stem: str, cols: list[str]) -> pd.DataFrame:
            return read_table(first_existing(root, f"{stem}.csv", f"{stem}.csv.gz"), cols, dtype={"dicom_id": str})

        split = table("mimic-cxr-2.0.0-split", ["dicom_id", "study_id", "subject_id", "split"])
        bad = set(split["split"]) - set(SPLITS)
        if bad:
            raise DataError(root, f"mimic-cxr-2.0.0-split: unknown split values {sorted(bad)}; expected {list(SPLITS)}")
        if self.views:
            meta = table("mimic-cxr-2.0.0-metadata", ["dicom_id", "ViewPosition"])
            split = split[split["dicom_id"].isin(meta.loc[meta["ViewPosition"].isin(self.views), "dicom_id"])]
        labels = table("mimic-cxr-2.0.0-chexpert", ["subject_id", "study_id", *OBSERVATIONS])
        df = split.merge(labels, on=["subject_id", "study_id"], how="left")
        values = np.array(df[OBSERVATIONS].fillna(0.0), dtype=np.float32)
        values[values == -1] = 1.0 if self.uncertain == "ones" else 0.0
        reports_root = Path(self.reports_dir) if self.reports_dir else root
        study_dir = [f"files/p{str(s)[:2]}/p{s}/s{t}" for s, t in zip(df["subject_id"], df["study_id"])]
        report_files = {d: inside(reports_root, f"{d}.txt") for d in dict.fromkeys(study_dir)}
        reports = {d: self._report(p) for d, p in report_files.items()}
        return pd.DataFrame(
            {
                "id": df["dicom_id"].to_numpy(),
                "split": df["split"].map(SPLITS).to_numpy(),
                "group": df["subject_id"].astype(str).to_numpy(),
                "label": list(values),
                "path": [str(inside(root, f"{d}/{i}.jpg")) for d, i in zip(study_dir, df["dicom_id"])],
                "report": [reports[d] for d in study_dir],
                "report_file": [str(report_files[d]) for d in study_dir],
            }
        )

    def _report(self, path: Path) -> str:
        """The chosen sections joined; '' when the file or all sections are missing (the manifest check names it)."""
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        found = report_sections(text)
        return " ".join(found[s] for s in self.sections if found.get(s))
