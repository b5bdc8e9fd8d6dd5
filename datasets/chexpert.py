"""CheXpert (v1.0 or v1.0-small): ``train.csv`` / ``valid.csv`` with image paths and 14 observations.

Values are 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned = negative). ``uncertain`` picks
the policy: ``ones`` (U-Ones), ``zeros`` (U-Zeros) or ``ignore`` (drop images with an uncertain label in a used
class, counted in the log). Test split ``5x200`` (GLoRIA/MGCA): for each of the five competition classes, 200
frontal training images positive for that class and certainly not positive for the other four, picked by
a seeded hash; all images of those patients leave the training pool. The official ``valid.csv`` is the
validation split. ``test_split: valid`` uses ``valid.csv`` as test and carves validation from training.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo, hash_order, inside, read_table

OBSERVATIONS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
log = logging.getLogger(__name__)
#: labeller vocabulary for chest X-ray reports over these observations (medvlp_bench.report_labeler)
REPORT_VOCABULARY = "chexpert"
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
INFO = DatasetInfo(
    key="chexpert",
    title="CheXpert v1.0 (or v1.0-small)",
    kind="2D chest X-ray (JPEG): multi-label classification, 5x200 test",
    layout=(
        "  train.csv, valid.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>\n"
        "  train/patientXXXXX/studyN/viewN_frontal.jpg   (Path may start with CheXpert-v1.0[-small]/)"
    ),
    licence="Stanford University School of Medicine CheXpert Dataset Research Use Agreement",
    url="https://stanfordmlgroup.github.io/competitions/chexpert/",
)


class CheXpert(AdapterDataModule):
    """CheXpert multi-label classification over ``classes`` (default: the five competition classes)."""

    info = INFO

    def __init__(
        self,
        root: str,
        *,
        classes: list[str] | None = None,
        uncertain: str = "ones",
        frontal_only: bool = True,
        test_split: str = "5x200",
        test_per_class: int = 200,
        **kw: Any,
    ) -> None:
        classes = list(classes or COMPETITION)
        unknown = sorted(set(classes) - set(OBSERVATIONS))
        if unknown:
            raise ValueError(f"chexpert: unknown classes {unknown}; choose from {OBSERVATIONS}")
        if uncertain not in ("ones", "zeros", "ignore"):
            raise ValueError(f"chexpert: uncertain must be ones, zeros or ignore, got {uncertain!r}")
        if test_split not in ("5x200", "valid"):
            raise ValueError(f"chexpert: test_split must be 5x200 or valid, got {test_split!r}")
        super().__init__(root, task_type="multilabel", class_names=classes, **kw)
        self.uncertain, self.frontal_only, self.test_split = uncertain, frontal_only, test_split
        self.test_per_class = int(test_per_class)

    def _table(self, root: Path, name: str) -> pd.DataFrame:
        csv = root / name
        df = read_table(csv, ["Path", "Frontal/Lateral", *OBSERVATIONS])
        if self.frontal_only:
            df = df[df["Frontal/Lateral"] == "Frontal"]
        df = df.copy()
        df["path"] = [str(inside(root, _strip_prefix(p))) for p in df["Path"]]
        df["id"] = [_strip_prefix(p) for p in df["Path"]]
        df["group"] = [PurePosixPath(p).parts[1] if len(PurePosixPath(p).parts) > 2 else p for p in df["id"]]
        bad = ~df[OBSERVATIONS].isin([1.0, 0.0, -1.0]) & df[OBSERVATIONS].notna()
        if bad.any(axis=None):
            raise DataError(csv, "observation values must be 1, 0, -1 or blank")
        return df

    def scan(self, root: Path) -> pd.DataFrame:
        train, valid = self._table(root, "train.csv"), self._table(root, "valid.csv")
        if self.test_split == "valid":
            train["split"], valid["split"] = "trainval", "test"
            return self._labels(pd.concat([train, valid]))
        test_ids = self._five_by_200(train)
        test_patients = set(train.loc[train["id"].isin(test_ids), "group"])
        train["split"] = np.where(train["id"].isin(test_ids), "test", "train")
        train = train[(train["split"] == "test") | ~train["group"].isin(test_patients)]
        valid["split"] = "val"
        return self._labels(pd.concat([train, valid]))

    def _five_by_200(self, train: pd.DataFrame) -> set[str]:
        """``test_per_class`` images per competition class, exclusively and certainly positive for it."""
        picked: set[str] = set()
        for c in COMPETITION:
            others = [o for o in COMPETITION if o != c]
            pool = train[(train[c] == 1) & ~train[others].isin([1.0, -1.0]).any(axis=1)]
            chosen = hash_order(pool["id"], f"{self.salt}|5x200|{c}")[: self.test_per_class]
            if len(chosen) < self.test_per_class:
                raise DataError(self.root, f"only {len(chosen)} exclusive {c!r} images for the 5x200 test")
            picked.update(chosen)
        return picked

    def _labels(self, df: pd.DataFrame) -> pd.DataFrame:
        values = np.array(df[self.class_names].fillna(0.0), dtype=np.float32)
        uncertain = values == -1
        if self.uncertain == "ignore":
            keep = ~uncertain.any(axis=1)
            if (~keep).any():
                log.info("chexpert: dropped %d image(s) with uncertain labels (uncertain=ignore)", int((~keep).sum()))
            df, values = df[keep], values[keep]
        else:
            values[uncertain] = 1.0 if self.uncertain == "ones" else 0.0
        out = df[["id", "split", "path", "group"]].copy()
        out["label"] = list(values)
        return out


def _strip_prefix(path: str) -> str:
    """``CheXpert-v1.0-small/train/...`` -> ``train/...`` (the CSV paths include the archive's folder name)."""
    parts = PurePosixPath(path).parts
    return str(PurePosixPath(*parts[1:])) if parts and parts[0].startswith("CheXpert-v1.0") else path
