"""A user's own image-report corpus: one CSV with an image path column, a text column, optional label columns.

Column names are configurable (``image_col``, ``text_col``, ``label_cols``, ``split_col``, ``id_col``,
``group_col``). Image paths are relative to the CSV's folder (the root) and may not leave it. Without a split
column the rows are carved 80/10/10 by ``group_col`` (e.g. patient) or by image path. Empty reports are errors
(or counted skips with ``on_error: skip``), as a silent empty caption would teach a contrastive model nothing.
Works for 2D images and, with ``spatial_dims: 3``, for NIfTI volumes or DICOM series folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medvlp_bench.data import SPLITS

from ._common import AdapterDataModule, DataError, DatasetInfo, inside, read_table

#: a user's own reports: no preset labeller vocabulary; report-label methods read the findings named by
#: ``label_cols`` or a list in the method config (medvlp_bench.report_labeler.corpus_vocabulary)
REPORT_VOCABULARY: str | None = None

INFO = DatasetInfo(
    key="image_text_csv",
    title="Image-text CSV (your own image-report corpus)",
    kind="2D or 3D images + reports: pre-training, retrieval, multi-label classification",
    layout=(
        "  <csv_name> with columns <image_col>,<text_col>[,<label_cols>...][,<split_col>]\n"
        "  image paths relative to the root"
    ),
    licence="yours",
    url="(your data)",
    reports=True,
)


class ImageTextCSV(AdapterDataModule):
    """Image-report pairs from a CSV; labels (if any) are multi-label 0/1 columns."""

    info = INFO
    fixed_dims = None
    carve_fractions = {"train": 0.8, "val": 0.1, "test": 0.1}

    def __init__(
        self,
        root: str,
        *,
        csv_name: str = "data.csv",
        image_col: str = "image",
        text_col: str = "report",
        label_cols: list[str] | None = None,
        split_col: str | None = None,
        id_col: str | None = None,
        group_col: str | None = None,
        need_labels: bool = False,
        **kw: Any,
    ) -> None:
        self.label_cols, self.need_labels = list(label_cols or []), bool(need_labels)
        super().__init__(root, task_type="multilabel", class_names=self.label_cols, **kw)
        self.csv_name, self.image_col, self.text_col = csv_name, image_col, text_col
        self.split_col, self.id_col, self.group_col = split_col, id_col, group_col

    def scan(self, root: Path) -> pd.DataFrame:
        csv = root / self.csv_name
        if self.need_labels and not self.label_cols:  # classification / zero-shot tasks: the labels are columns
            found = list(read_table(csv, [], nrows=0).columns)
            raise DataError(
                csv,
                f"this task needs label columns: name them with task.data.label_cols=[...] (0/1 values); "
                f"the CSV has columns {found}",
            )
        cols = [self.image_col, self.text_col, *self.label_cols]
        cols += [c for c in (self.split_col, self.id_col, self.group_col) if c]
        table = read_table(csv, cols, dtype={self.image_col: str, self.text_col: str})
        paths = []
        for n, p in enumerate(table[self.image_col], 2):
            if not isinstance(p, str) or not p.strip():
                raise DataError(csv, f"line {n}: empty {self.image_col!r}")
            try:
                paths.append(str(inside(root, p.strip())))
            except DataError as e:
                raise DataError(csv, f"line {n}: {e}") from None
        labels = (
            table[self.label_cols].to_numpy(np.float32) if self.label_cols else np.zeros((len(table), 0), np.float32)
        )
        out = pd.DataFrame(
            {
                "id": table[self.id_col].astype(str) if self.id_col else table[self.image_col].str.strip(),
                "path": paths,
                "report": table[self.text_col].fillna("").str.strip(),
                "label": list(labels),
                "split": table[self.split_col].to_numpy() if self.split_col else None,
            }
        )
        if self.group_col:
            out["group"] = table[self.group_col].astype(str).to_numpy()
        if self.split_col:
            bad = set(out["split"]) - set(SPLITS)
            if bad:
                raise DataError(csv, f"column {self.split_col!r} has values {sorted(map(str, bad))}; allowed {SPLITS}")
        return out
