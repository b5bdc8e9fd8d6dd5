"""Machinery shared by the real-data adapters: errors that name the file, dataset infos, safe paths, CSV checks,
deterministic split carving, the problem collector behind ``on_error: raise|skip``, and ``AdapterDataModule``.

An adapter subclasses :class:`AdapterDataModule` and implements ``scan(root)``, which reads the dataset's own
on-disk layout into the shared manifest (``id, split, label, path`` and optionally ``report, mask_path, boxes,
rle, group``). Everything else -- root checks, split carving, split files, file checks, skipping, the cached
MONAI reader -- is here and in ``_reader.py``, so each adapter stays a page long.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset

from medvlp_bench.data import SPLITS, MedDataModule

from ._errors import DataError, DatasetNotFoundError
from ._reader import FileReader, Preprocess, intensity_transforms

log = logging.getLogger(__name__)

#: adapter modules, in the order ``medbench data list`` shows them
ADAPTERS = tuple(
    [
        "rsna",
        "chexpert",
        "covidx",
        "siim",
        "nih_cxr14",
        "mimic_cxr",
        "msd",
        "btcv",
        "brats",
        "medmnist",
        "imagefolder",
        "image_text_csv",
        "nifti_folder",
    ]
)
SPLITS_DIR = Path(__file__).resolve().parent / "splits"


@dataclass(frozen=True)
class DatasetInfo:
    """What ``medbench data list`` prints and what a missing-root error tells the user."""

    key: str
    title: str
    kind: str
    layout: str
    licence: str
    url: str
    masks: bool = False
    reports: bool = False

    def how_to_get(self) -> str:
        return f"obtain {self.title} from {self.url} (licence: {self.licence})"


def registry() -> dict[str, DatasetInfo]:
    """Dataset infos of every adapter module, keyed by ``DatasetInfo.key``."""
    infos = [importlib.import_module(f"medvlp_bench.datasets.{m}").INFO for m in ADAPTERS]
    return {i.key: i for i in infos}


# ---- paths and tables ---------------------------------------------------------------------------
def require_root(root: str | Path, info: DatasetInfo, must_have: Sequence[str] = ()) -> Path:
    """The dataset root, or an error naming the path looked at, the expected layout and where to get it."""
    path = Path(root).expanduser()
    missing = [] if path.is_dir() else [str(path)]
    missing += [str(path / m) for m in must_have if path.is_dir() and not (path / m).exists()]
    if missing:
        raise DatasetNotFoundError(
            missing[0],
            f"not found; {info.title} expects this layout under the root:\n{info.layout}\n"
            f"{info.how_to_get()}; point the config at it with root=... or paths.data_dir=... (env MEDBENCH_DATA)",
        )
    return path


def inside(root: Path, rel: str | os.PathLike) -> Path:
    """``root / rel`` lexically normalised; refuses paths that leave ``root`` (``..``, absolute paths elsewhere).

    Lexical, not ``resolve()``: a user's own symlinks inside the root are fine, a ``../`` in a CSV is not.
    """
    base = os.path.normpath(os.path.abspath(root))
    full = os.path.normpath(os.path.join(base, os.fspath(rel)))
    if os.path.commonpath([base, full]) != base:
        raise DataError(rel, f"path escapes the dataset root {base}")
    return Path(full)


#: the tables ``read_table`` read during one ``scan`` (set by ``AdapterDataModule._scan_index``), so that a
#: duplicated sample id can be traced back to its CSV file, column and lines
_TABLES: ContextVar[list[tuple[Path, pd.DataFrame]] | None] = ContextVar("medbench_tables", default=None)


def read_table(path: Path, required: Iterable[str], **kw: Any) -> pd.DataFrame:
    """Read a CSV (``.csv`` or ``.csv.gz``) and check its columns, naming the file and what is missing."""
    try:
        df = pd.read_csv(path, **kw)
    except FileNotFoundError:
        raise DatasetNotFoundError(path, "file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(path, f"cannot parse as CSV: {e}") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; columns found: {list(df.columns)}")
    if (tables := _TABLES.get()) is not None:
        tables.append((Path(path), df))
    return df


def duplicate_error(
    ids: pd.Series, tables: Sequence[tuple[Path, pd.DataFrame]], dataset: str, id_col: bool
) -> DataError:
    """The error for a manifest whose ids repeat: the CSV, column and lines of the first repeated value, and
    the ways out. Real metadata often has one row per visit or note, so the same image can be on several rows.

    The lines are counted as in a text editor with the header on line 1 (row ``i`` of the table is line
    ``i + 2``); ``id_col``: the adapter can take its ids from another column (``image_text_csv``).
    """
    first = str(ids[ids.duplicated()].iloc[0])
    way_out = "keep one row per sample (drop the duplicate rows"
    if id_col:
        way_out = (
            "give each row its own id with id_col=<a column with one value per row, e.g. a note or visit id> and "
            "group_col=<the image or patient column> so that one image's rows stay in one split, or " + way_out
        )
    n = int((ids == first).sum())
    found = []  # (how far the hit count is from n, order, path, column, rows): the id's own column fits best
    for path, table in tables:
        for col in table.columns:
            text = table[col].astype(str).str.strip()
            hits = text.index[(text == first) | text.str.endswith("/" + first)]
            if len(hits) >= 2:
                found.append((abs(len(hits) - n), len(found), path, col, [int(i) + 2 for i in hits]))
    if not found:
        return DataError(dataset, f"sample id {first!r} occurs {n} times, but ids must be unique; {way_out})")
    _, _, path, col, lines = min(found)
    shown = ", ".join(map(str, lines[:10]))
    shown = f"{shown} and {len(lines) - 10} more" if len(lines) > 10 else " and ".join(shown.rsplit(", ", 1))
    return DataError(
        path,
        f"{first!r} is on {len(lines)} rows of column {col!r} (lines {shown}), but each sample must be one row; "
        f"{way_out}, e.g. pandas df.drop_duplicates(subset=[{col!r}]))",
    )


def first_existing(root: Path, *names: str) -> Path:
    """The first of ``names`` that exists under ``root`` (e.g. ``x.csv`` or ``x.csv.gz``)."""
    for n in names:
        if (root / n).exists():
            return root / n
    raise DatasetNotFoundError(root / names[0], f"not found (also looked for {list(names[1:])})")


# ---- splits -------------------------------------------------------------------------------------
def hash_order(keys: Iterable[str], salt: str) -> list[str]:
    """Unique keys sorted by sha256(salt|key): a seeded shuffle that ignores input order and hash randomisation."""
    return sorted(set(map(str, keys)), key=lambda k: hashlib.sha256(f"{salt}|{k}".encode()).hexdigest())


def carve(keys: Iterable[str], fractions: dict[str, float], salt: str) -> dict[str, str]:
    """Assign each unique key to a split with exact counts (largest splits last get the rounding rest).

    Every split with a non-zero fraction gets at least one key when there are enough keys.
    """
    order = hash_order(keys, salt)
    names = [s for s in fractions if fractions[s] > 0]
    total = sum(fractions[s] for s in names)
    counts = {s: max(1, round(len(order) * fractions[s] / total)) if len(order) >= len(names) else 0 for s in names}
    rest = max(names, key=lambda s: fractions[s])
    counts[rest] = len(order) - sum(c for s, c in counts.items() if s != rest)
    out, i = {}, 0
    for s in sorted(names, key=lambda s: s == rest):
        for k in order[i : i + counts[s]]:
            out[k] = s
        i += counts[s]
    return out


def read_split_file(name: str | Path) -> dict[str, str]:
    """An ``id,split`` CSV; relative names are looked up in the package's committed ``datasets/splits/``."""
    path = Path(name) if Path(name).is_absolute() else SPLITS_DIR / name
    df = read_table(path, ["id", "split"], dtype=str)
    bad = set(df["split"]) - set(SPLITS)
    if bad:
        raise DataError(path, f"unknown split names {sorted(bad)}; allowed {SPLITS}")
    return dict(zip(df["id"], df["split"]))


# ---- problems -----------------------------------------------------------------------------------
class Problems:
    """Collects (id, file, problem); ``resolve`` raises them all at once or logs a counted skip."""

    def __init__(self, dataset: str) -> None:
        self.dataset, self.items = dataset, []

    def add(self, sid: str, path: object, problem: str) -> None:
        self.items.append((str(sid), str(path), problem))

    def resolve(self, on_error: str) -> set[str]:
        if not self.items:
            return set()
        listing = "\n".join(f"  {p}: {msg}" for _, p, msg in self.items[:20])
        more = f"\n  ... and {len(self.items) - 20} more" if len(self.items) > 20 else ""
        if on_error != "skip":
            raise DataError(
                self.dataset,
                f"{len(self.items)} problem(s):\n{listing}{more}\n"
                f"(set on_error=skip in the data config to skip these samples with a logged count)",
            )
        log.warning("%s: skipping %d sample(s) with problems:\n%s%s", self.dataset, len(self.items), listing, more)
        return {sid for sid, _, _ in self.items}


class _Probe(Dataset):
    """Reads every row once (in DataLoader workers); yields ``(index, problem or None)``."""

    def __init__(self, rows: list[dict[str, Any]], read: Callable[[dict], dict]) -> None:
        self.rows, self.read = rows, read

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, str | None]:
        try:
            self.read(self.rows[i])
        except DataError as e:
            return i, str(e)
        return i, None


def _first(batch: list) -> Any:
    return batch[0]


def probe_rows(rows: list[dict[str, Any]], read: Callable[[dict], dict], num_workers: int = 0) -> list[tuple[int, str]]:
    """Read every row (in parallel when ``num_workers``); return ``(row index, message)`` for the bad ones."""
    loader = DataLoader(_Probe(rows, read), batch_size=1, num_workers=num_workers, collate_fn=_first)
    return [(i, msg) for i, msg in loader if msg is not None]


# ---- the adapter base ---------------------------------------------------------------------------
class AdapterDataModule(MedDataModule):
    """Base of the real-data adapters: config plumbing, manifest checks, splits and the cached reader.

    Args:
        root: the dataset folder, in the dataset's own layout.
        size: output size per spatial axis (2D: size x size, 3D: size^3) unless ``roi`` is given.
        target: ``label`` (classification, pre-training) or ``mask`` (segmentation).
        spatial: ``resize`` | ``pad_crop`` | ``longest_pad`` (2D: keep aspect, pad); None: the adapter's default.
        roi: explicit output shape (3D: e.g. [96, 96, 64]) instead of ``size``.
        intensity: intensity spec (``{type: scale|window|zscore|divide|none, ...}``), after the cache.
        orientation: axis codes (``RAS``) for 3D; None keeps voxel order.
        cache_dir: where preprocessed arrays are cached (keyed by preprocessing settings and file stat); None: off.
        on_error: ``raise`` (default) or ``skip`` bad samples with a logged count (files are then read once up front).
        split_seed: salt of the deterministic split carving; split_file: committed ``id,split`` CSV.
        exclude: sample ids to leave out (logged).
    """

    info: ClassVar[DatasetInfo]
    default_spatial: ClassVar[str | None] = None  # None: longest_pad in 2D, resize in 3D
    default_intensity: ClassVar[dict[str, Any]] = {"type": "scale"}
    fixed_dims: ClassVar[int | None] = 2
    carve_fractions: ClassVar[dict[str, float]] = {"train": 0.7, "val": 0.15, "test": 0.15}

    def __init__(
        self,
        root: str,
        *,
        size: int,
        name: str | None = None,
        target: str = "label",
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        spatial: str | None = None,
        roi: Sequence[int] | None = None,
        intensity: dict[str, Any] | None = None,
        orientation: str | None = None,
        cache_dir: str | None = None,
        on_error: str = "raise",
        split_seed: int = 0,
        split_file: str | None = None,
        val_fraction: float = 0.1,
        exclude: Sequence[str] = (),
        **kw: Any,
    ) -> None:
        super().__init__(name=name or self.info.key, **kw)
        if target not in ("label", "mask"):
            raise ValueError(f"{self.name}: target must be 'label' or 'mask', got {target!r}")
        if target == "mask" and not self.info.masks:
            raise ValueError(f"{self.name}: {self.info.title} has no segmentation masks (target=mask)")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"{self.name}: on_error must be 'raise' or 'skip', got {on_error!r}")
        dims = int(spatial_dims or self.fixed_dims or 2)
        if self.fixed_dims is not None and dims != self.fixed_dims:
            raise ValueError(f"{self.name}: {self.info.title} is {self.fixed_dims}D, config says spatial_dims={dims}")
        self.root, self.size, self.target, self.has_masks = str(root), int(size), target, target == "mask"
        self.spatial_dims = dims
        self.in_channels = int(in_channels or getattr(self, "in_channels", 1))
        self.on_error, self.split_seed, self.split_file = on_error, int(split_seed), split_file
        self.val_fraction, self.exclude = float(val_fraction), set(map(str, exclude))
        self.intensity = dict(intensity) if intensity is not None else dict(self.default_intensity)
        self.cache_dir = cache_dir
        self.prep = Preprocess(
            spatial_dims=dims,
            size=self.size,
            channels=self.in_channels,
            spatial=spatial or self.default_spatial or ("longest_pad" if dims == 2 else "resize"),
            roi=tuple(int(r) for r in roi) if roi else None,
            orientation=orientation,
        )

    # ---- to implement ---------------------------------------------------------------------------
    def scan(self, root: Path) -> pd.DataFrame:
        """Read the on-disk layout into manifest rows (``split`` may be None or ``trainval`` to carve)."""
        raise NotImplementedError

    def label_map(self) -> dict[int, int] | None:
        """Mask value remapping applied before resizing (e.g. BraTS 4 -> 3)."""
        return None

    # ---- provided -------------------------------------------------------------------------------
    @property
    def salt(self) -> str:
        return f"{self.info.key}|{self.split_seed}"

    def preflight(self) -> int:
        """Check the root and read the dataset's index (its CSV or list files, folder listings), not the images.

        ``medvlp_bench.preflight`` calls this before a run does any work, so a missing dataset, a missing index
        file or a duplicated id fails in seconds; returns the number of samples found.
        """
        return len(self._scan_index())

    def _scan_index(self) -> pd.DataFrame:
        """Root check, ``scan`` and unique string ids: the manifest before splits and per-file checks."""
        root = require_root(self.root, self.info)
        token = _TABLES.set([])
        try:
            df = self.scan(root).reset_index(drop=True)
            tables = _TABLES.get() or []
        finally:
            _TABLES.reset(token)
        if df.empty:
            raise DataError(root, f"no samples found; expected layout:\n{self.info.layout}")
        df["id"] = df["id"].astype(str)
        if df["id"].duplicated().any():
            raise duplicate_error(df["id"], tables, self.name, id_col=hasattr(self, "id_col"))
        return df

    def build_manifest(self) -> pd.DataFrame:
        df = self._scan_index()
        if self.exclude:
            drop = df["id"].isin(self.exclude)
            log.info("%s: excluding %d sample(s) listed in the config", self.name, int(drop.sum()))
            df = df[~drop]
        df = self._splits(df)
        return self._check(df).reset_index(drop=True)

    def _splits(self, df: pd.DataFrame) -> pd.DataFrame:
        """Carve missing splits by group (patient) when given, else by id; then apply a committed split file."""
        df = df.copy()
        if "split" not in df.columns:
            df["split"] = None
        group = df["group"].astype(str) if "group" in df.columns else df["id"]
        todo = df["split"].isna()
        if todo.any():
            assign = carve(group[todo], self.carve_fractions, self.salt)
            df.loc[todo, "split"] = group[todo].map(assign)
        tv = df["split"] == "trainval"
        if tv.any():
            assign = carve(group[tv], {"train": 1 - self.val_fraction, "val": self.val_fraction}, self.salt + "|val")
            df.loc[tv, "split"] = group[tv].map(assign)
        if self.split_file:
            fixed = read_split_file(self.split_file)
            known = df["id"].isin(fixed.keys())
            df.loc[known, "split"] = df.loc[known, "id"].map(fixed)
            if (~known).any():
                log.warning(
                    "%s: %d id(s) not in %s, split by the hash rule", self.name, (~known).sum(), self.split_file
                )
        return df

    def _check(self, df: pd.DataFrame) -> pd.DataFrame:
        """File existence, labels and reports; each problem names the file (raise, or skip with a count)."""
        problems = Problems(self.name)
        for row in df.itertuples(index=False):
            paths = row.path if isinstance(row.path, list | tuple) else [row.path]
            mask = getattr(row, "mask_path", None)
            for p in [*paths, *([mask] if self.has_masks and isinstance(mask, str) else [])]:
                if not os.path.exists(p):
                    problems.add(row.id, p, "file not found")
            if self.has_masks and "mask_path" in df.columns and not isinstance(mask, str):
                problems.add(row.id, paths[0], "no mask for this image")
            if "report" in df.columns and not (isinstance(row.report, str) and row.report.strip()):
                problems.add(row.id, getattr(row, "report_file", paths[0]), "empty report")
            if "label" in df.columns and np.isnan(np.asarray(row.label, dtype=np.float64)).any():
                problems.add(row.id, paths[0], "label is missing (NaN)")
        bad = problems.resolve(self.on_error)
        df = df[~df["id"].isin(bad)]
        if "mask_path" in df.columns and not self.has_masks:
            df = df.drop(columns="mask_path")  # classification does not read masks
        if self.on_error == "skip":
            df = self._skip_unreadable(df)
        return df

    def _skip_unreadable(self, df: pd.DataFrame) -> pd.DataFrame:
        """With ``on_error: skip``, read every file once up front (filling the cache) and drop unreadable ones."""
        rows = df.to_dict("records")
        bad = probe_rows(rows, self.reader(), self.num_workers)
        if bad:
            problems = Problems(self.name)
            for i, msg in bad:
                problems.add(rows[i]["id"], "", msg)
            drop = problems.resolve("skip")
            df = df[~df["id"].isin(drop)]
        return df

    def reader(self) -> FileReader:
        return FileReader(
            dataset=self.name,
            prep=self.prep,
            with_mask=self.has_masks,
            cache_dir=self.cache_dir,
            label_map=self.label_map(),
            n_seg_classes=len(getattr(self, "seg_classes", []) or []) or None,
        )

    def intensity_transforms(self) -> list[Callable]:
        return intensity_transforms(self.intensity)
