"""BraTS glioma MRI: one folder per case with T1, T1ce, T2, FLAIR and a segmentation, all NIfTI.

Editions and their on-disk names and label values, remapped to contiguous classes 0..3
(background, necrotic/non-enhancing core, peritumoural edema, enhancing tumour):

| edition | files | labels on disk | remap |
|---|---|---|---|
| 2018-2021 | ``<case>_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg`` | 0, 1 NCR/NET, 2 ED, 4 ET | 4 -> 3 |
| 2023+ (GLI) | ``<case>-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg`` | 0, 1 NCR, 2 ED, 3 ET | none |

The edition is detected per case. BraTS 2020's case 355 ships its mask under another name, so a missing
``_seg`` falls back to the folder's only ``*seg*`` file. BraTS 2018/2019 keep cases under ``HGG/`` and ``LGG/``:
there the label is the grade (1 = HGG), for BrainMVP's BraTS18 classification. Channel order: T1, T1ce, T2,
FLAIR. Split: random 70/15/15 of cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import AdapterDataModule, DataError, DatasetInfo

EDITIONS = {"2018-2021": ("_", ["t1", "t1ce", "t2", "flair"], {4: 3}), "2023": ("-", ["t1n", "t1c", "t2w", "t2f"], {})}
SEG_CLASSES = ["background", "necrotic_core", "edema", "enhancing"]
INFO = DatasetInfo(
    key="brats",
    title="BraTS (Brain Tumor Segmentation) 2018-2023",
    kind="3D brain MRI, 4 channels (NIfTI): tumour sub-region segmentation; HGG/LGG grade (2018/2019)",
    layout=(
        "  <case>/<case>_t1.nii.gz, _t1ce, _t2, _flair, _seg   (2018-2021; 2018/2019 under HGG/ and LGG/)\n"
        "  <case>/<case>-t1n.nii.gz, -t1c, -t2w, -t2f, -seg     (2023+)"
    ),
    licence="BraTS data terms (research use, cite the BraTS papers); 2021+ via Synapse, CC BY 4.0 for some releases",
    url="https://www.synapse.org/brats (BraTS 2021: https://www.synapse.org/#!Synapse:syn25829067)",
    masks=True,
)


def _nifti(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{s}" for s in (".nii.gz", ".nii") if (folder / f"{stem}{s}").is_file()), None)


def _dirs(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.iterdir()) if f.is_dir() and not f.name.startswith(".")]


class BraTS(AdapterDataModule):
    """BraTS cases: ``target: mask`` for the 4-class segmentation; ``target: label`` for the grade (HGG/LGG)."""

    info = INFO
    fixed_dims = 3
    in_channels = 4
    default_intensity = {"type": "zscore", "nonzero": True}
    seg_classes = SEG_CLASSES

    def __init__(self, root: str, *, orientation: str | None = "RAS", **kw: Any) -> None:
        super().__init__(root, task_type="binary", class_names=["HGG"], orientation=orientation, **kw)
        if self.in_channels != 4:
            raise ValueError(f"brats has 4 MRI channels, config says in_channels={self.in_channels}")
        self._edition: str | None = None

    def scan(self, root: Path) -> pd.DataFrame:
        graded = (root / "HGG").is_dir() or (root / "LGG").is_dir()
        if graded:
            folders = [
                (f, np.float32(g == "HGG")) for g in ("HGG", "LGG") if (root / g).is_dir() for f in _dirs(root / g)
            ]
        else:
            folders = [(f, np.float32(0)) for f in _dirs(root)]
        if self.target == "label" and not graded:
            raise DataError(root, "target=label needs HGG/ and LGG/ folders (BraTS 2018/2019); use target=mask")
        records = [self._case(f, grade) for f, grade in folders]
        return pd.DataFrame.from_records([r for r in records if r is not None])

    def _case(self, folder: Path, grade: np.float32) -> dict[str, Any] | None:
        case = folder.name
        found = [(ed, [_nifti(folder, f"{case}{sep}{m}") for m in mods]) for ed, (sep, mods, _) in EDITIONS.items()]
        edition, channels = next(((ed, ch) for ed, ch in found if all(ch)), (None, []))
        if edition is None:
            if any(folder.glob("*.nii*")):
                raise DataError(
                    folder, f"missing modalities; expected {case}_t1/_t1ce/_t2/_flair or {case}-t1n/-t1c/-t2w/-t2f"
                )
            return None  # not a case folder (e.g. a stray sub-folder)
        if self._edition not in (None, edition):
            raise DataError(folder, f"mixes BraTS editions ({self._edition} and {edition}) in one root")
        self._edition = edition
        seg = _nifti(folder, f"{case}{EDITIONS[edition][0]}seg")
        if seg is None:  # e.g. BraTS20_Training_355 names its mask W39_1998.09.19_Segm.nii
            candidates = [p for p in folder.glob("*.nii*") if "seg" in p.name.lower()]
            seg = candidates[0] if len(candidates) == 1 else None
        return {
            "id": case,
            "split": None,
            "path": [str(c) for c in channels],
            "mask_path": str(seg) if seg else None,
            "label": grade,
        }

    def label_map(self) -> dict[int, int] | None:
        if self._edition is None:
            self.manifest  # noqa: B018 - the edition is known once the folders are scanned
        return EDITIONS[self._edition][2] if self._edition else None
