"""Tiny fixtures in each dataset's exact on-disk format: real file names, CSV headers, DICOM tags, NIfTI files.

Every writer returns what a test needs to check the adapter against (labels, boxes, masks). Images are tiny
(32x32 2D, ~12^3 3D) so the adapter tests stay fast. Headers follow the public releases; see each docstring.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medvlp_bench.datasets.chexpert import COMPETITION, OBSERVATIONS
from medvlp_bench.datasets.nih_cxr14 import FINDINGS as NIH_FINDINGS

RNG = np.random.default_rng(0)


# ---- DICOM ------------------------------------------------------------------------------------------
def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    patient_id: str = "anon",
    sop_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    photometric: str = "MONOCHROME2",
    jpeg: bool = False,
    modality: str = "CR",
    **tags: Any,
) -> Path:
    """A 2D DICOM like the RSNA/SIIM Kaggle files: Secondary Capture, CR, chest PA, 8-bit (JPEG baseline when
    ``jpeg``, as the RSNA/SIIM files are) or 16-bit uncompressed; extra ``tags`` (e.g. RescaleSlope) are set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), series_uid or generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge = patient_id, patient_id, "M", "051Y"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", "PA"
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.168, 0.168]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, photometric, 0
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    for k, v in tags.items():
        setattr(ds, k, v)
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=100)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].is_undefined_length = True
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(folder: Path, volume: np.ndarray, spacing: float = 2.0) -> Path:
    """A CT series (axial slices ``volume[k]``) with geometry tags, rescale intercept -1024, no file suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for k, sl in enumerate(volume):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"CT.{uid}"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
            CTImageStorage,
            uid,
            study,
            series,
        )
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "ct-case", k + 1
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, float(k * spacing)], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], spacing
        ds.Rows, ds.Columns = sl.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (sl + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"CT.{uid}", enforce_file_format=True)
    return folder


def xray(shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    return RNG.integers(20, 200, shape, dtype=np.uint8)


def save_png(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


# ---- 2D chest X-ray datasets ------------------------------------------------------------------------
def rsna(root: Path, n: int = 8) -> dict[str, Any]:
    """``stage_2_train_labels.csv`` (patientId,x,y,width,height,Target; one row per box) + JPEG DICOMs."""
    rows, truth = [], {}
    for i in range(n):
        pid = f"{i:08x}-0000-4000-8000-{i:012x}"
        boxes = [[4.0, 6.0, 10.0, 8.0], [20.0, 18.0, 6.0, 10.0]][: (2 if i % 3 == 0 else 0) + (i % 3 == 1)]
        rows += [[pid, *b, 1] for b in boxes] or [[pid, None, None, None, None, 0]]
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", xray(), patient_id=pid, jpeg=True)
        truth[pid] = boxes
    pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"]).to_csv(
        root / "stage_2_train_labels.csv", index=False
    )
    pd.DataFrame({"patientId": list(truth), "class": ["Normal"] * n}).to_csv(
        root / "stage_2_detailed_class_info.csv", index=False
    )
    return truth


#: the released header: five metadata columns, then the 14 observations in the reader's (CheXpert's) order
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *OBSERVATIONS]


def chexpert(root: Path, per_class: int = 3) -> pd.DataFrame:
    """``CheXpert-v1.0-small/{train,valid}.csv`` with paths prefixed by the archive folder, JPEGs per study.

    For each competition class ``per_class`` exclusive positives (one patient each), plus an uncertain image,
    a lateral view and a mixed-positive image for the first patients.
    """
    base = root / "CheXpert-v1.0-small"
    recs = []
    pid = 0

    def add(split: str, patient: int, view: str, values: dict[str, float]) -> None:
        rel = f"{split}/patient{patient:05d}/study{len(recs) + 1}/view1_{view.lower()}.jpg"
        save_png(base / rel, xray(), "JPEG")
        row = dict.fromkeys(CHEXPERT_COLUMNS, None)
        row.update({"Path": f"CheXpert-v1.0-small/{rel}", "Sex": "Female", "Age": 60, "Frontal/Lateral": view})
        row.update({"AP/PA": "AP" if view == "Frontal" else None, **values, "_split": split})
        recs.append(row)

    for c in COMPETITION:
        for _ in range(per_class):
            pid += 1
            add("train", pid, "Frontal", {c: 1.0, **{o: 0.0 for o in COMPETITION if o != c}})
    pid += 1
    add("train", pid, "Frontal", {"Edema": -1.0, "Cardiomegaly": 1.0})  # uncertain
    add("train", pid, "Lateral", {"Edema": 1.0})  # lateral: dropped with frontal_only
    pid += 1
    add("train", pid, "Frontal", {"Edema": 1.0, "Atelectasis": 1.0})  # not exclusive
    add("train", 1, "Frontal", {"No Finding": 1.0})  # second image of a 5x200 patient: leaves train
    for k in range(3):
        add("valid", 64541 + k, "Frontal", {c: float(k == i) for i, c in enumerate(COMPETITION)})
    df = pd.DataFrame(recs)
    for split in ("train", "valid"):
        df[df["_split"] == split][CHEXPERT_COLUMNS].to_csv(base / f"{split}.csv", index=False)
    return df


def covidx(root: Path, version: str = "9A") -> dict[str, list[tuple[str, str]]]:
    """``train_COVIDx9A.txt``/``test_COVIDx9A.txt`` (or ``train.txt``/``val.txt``/``test.txt`` for CXR-4) lines
    ``patient_id filename class source`` and the images in ``train/``, ``test/`` (``val/``)."""
    three = version.endswith("A")
    classes = ["normal", "pneumonia", "COVID-19"] if three else ["negative", "positive"]
    splits = ("train", "test") if version[0].isdigit() else ("train", "val", "test")
    out = {}
    for split in splits:
        lines, items = [], []
        for i in range(9 if split == "train" else 4):
            cls = classes[i % len(classes)]
            name = f"{split} img {i}.png" if i == 0 else f"{split}-{i:03d}.png"  # one name with spaces
            save_png(root / split / name, xray())
            lines.append(f"{100 + i // 2} {name} {cls} {'rsna' if i % 2 else 'cohen'}")
            items.append((name, cls))
        txt = f"{split}_COVIDx{version}.txt" if version[0].isdigit() else f"{split}.txt"
        (root / txt).write_text("\n".join(lines) + "\n")
        out[split] = items
    return out


def mask_to_relative_rle(mask: np.ndarray) -> str:
    """The competition's ``mask2rle``: column-major pixels, (gap since last run end, run length) pairs."""
    flat = mask.T.reshape(-1)
    runs, pos, last_end = [], 0, 0
    while pos < flat.size:
        if flat[pos]:
            start = pos
            while pos < flat.size and flat[pos]:
                pos += 1
            runs += [start - last_end, pos - start]
            last_end = pos
        else:
            pos += 1
    return " ".join(map(str, runs)) if runs else "-1"


def siim(root: Path, n: int = 6) -> dict[str, np.ndarray]:
    """``train-rle.csv`` (header ``ImageId, EncodedPixels``) and ``dicom-images-train/<study>/<series>/<sop>.dcm``."""
    lines, truth = ["ImageId, EncodedPixels"], {}
    for i in range(n):
        sop, study, series = generate_uid(), generate_uid(), generate_uid()
        write_dicom(root / "dicom-images-train" / study / series / f"{sop}.dcm", xray(), sop_uid=sop, jpeg=True)
        full = np.zeros((32, 32), np.uint8)
        if i % 2:
            regions = [(slice(3, 9), slice(20, 30)), (slice(15, 28), slice(2, 6))][: 1 + (i % 3 == 0)]
            for r, c in regions:
                part = np.zeros_like(full)
                part[r, c] = 1
                full |= part
                lines.append(f"{sop}, {mask_to_relative_rle(part)}")
        else:
            lines.append(f"{sop}, -1")
        truth[sop] = full
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    return truth


def nih(root: Path, patients: int = 8) -> pd.DataFrame:
    """``Data_Entry_2017.csv`` (the 2017 header, trailing comma included), the two split lists, and
    ``images_001/images/*.png`` as in the archive download."""
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    )
    lines, recs = [header], []
    for p in range(1, patients + 1):
        for f in range(2):
            name = f"{p:08d}_{f:03d}.png"
            labels = "No Finding" if (p + f) % 3 == 0 else "|".join(NIH_FINDINGS[(p + k) % 14] for k in range(1 + f))
            lines.append(f"{name},{labels},{f},{p},{40 + p},M,PA,2500,2048,0.168,0.168,")
            save_png(root / "images_001" / "images" / name, xray())
            recs.append({"name": name, "labels": labels, "patient": p, "test": p > patients - 2})
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    df = pd.DataFrame(recs)
    (root / "train_val_list.txt").write_text("\n".join(df.loc[~df["test"], "name"]) + "\n")
    (root / "test_list.txt").write_text("\n".join(df.loc[df["test"], "name"]) + "\n")
    return df


#: ``mimic-cxr-2.0.0-chexpert.csv`` lists the same 14 observations alphabetically, not in CheXpert's order, so the
#: reader must select the columns by name
MIMIC_OBS = sorted(OBSERVATIONS)
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // ?pna

 COMPARISON:  ___

 FINDINGS:

 There is a {finding} in the right lower lobe.  No pleural effusion.
 Heart size is normal.

 IMPRESSION:

 {impression}
"""


def mimic(root: Path, studies: int = 6) -> pd.DataFrame:
    """MIMIC-CXR-JPG: ``mimic-cxr-2.0.0-{split,metadata,chexpert}.csv.gz``, ``files/pXX/pXXXXXXXX/sXXXXXXXX/*.jpg``
    and the MIMIC-CXR report ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (one study without sections)."""
    split_rows, meta_rows, label_rows, recs = [], [], [], []
    for k in range(studies):
        subject, study = 10000032 + k, 50414267 + k
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
        split = ["train", "train", "train", "validate", "test", "train"][k % 6]
        for view in ("PA", "LATERAL"):
            dicom_id = f"{k:08x}-bde0afdd-112c0b34-7bc16eac-{view[:2].lower()}"
            save_png(folder / f"{dicom_id}.jpg", xray(), "JPEG")
            split_rows.append([dicom_id, study, subject, split])
            meta_rows.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, 32, 32, 21800506, 213014.531])
            recs.append({"dicom_id": dicom_id, "view": view, "split": split, "study": study, "k": k})
        text = REPORT.format(finding=f"opacity {k}", impression=f"Pneumonia {k}.") if k != 5 else "WET READ: ___\n"
        (folder.parent / f"s{study}.txt").write_text(text)
        label_rows.append([subject, study, *[1.0 if i == k else (-1.0 if i == k + 1 else None) for i in range(14)]])

    def gz(name: str, rows: list, cols: list[str]) -> None:
        with gzip.open(root / name, "wt") as f:
            pd.DataFrame(rows, columns=cols).to_csv(f, index=False)

    gz("mimic-cxr-2.0.0-split.csv.gz", split_rows, ["dicom_id", "study_id", "subject_id", "split"])
    meta_cols = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition"]
    gz("mimic-cxr-2.0.0-metadata.csv.gz", meta_rows, [*meta_cols, "Rows", "Columns", "StudyDate", "StudyTime"])
    gz("mimic-cxr-2.0.0-chexpert.csv.gz", label_rows, ["subject_id", "study_id", *MIMIC_OBS])
    return pd.DataFrame(recs)


# ---- 3D datasets ------------------------------------------------------------------------------------
def volume(shape: tuple[int, ...] = (12, 10, 8), scale: float = 100.0) -> np.ndarray:
    return (RNG.random(shape) * scale).astype(np.float32)


def label_map(shape: tuple[int, int, int] = (12, 10, 8), values: tuple[int, ...] = (1, 2)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for i, v in enumerate(values):
        lab[2 + 3 * i : 4 + 3 * i, 2:6, 2:6] = v
    return lab


def msd(root: Path, n: int = 6, with_json: bool = True, channels: int = 1, nnunet: bool = False) -> list[str]:
    """``imagesTr``/``labelsTr`` (+ ``dataset.json`` as released, with ``./`` paths) plus the archive's ``._`` files.
    ``channels > 1``: 4D images (channel last) as Task01; ``nnunet``: one ``case_000C.nii.gz`` per channel."""
    cases = [f"hippocampus_{i:03d}" for i in range(1, n + 1)]
    for c in cases:
        if nnunet:
            for ch in range(channels):
                save_nifti(root / "imagesTr" / f"{c}_{ch:04d}.nii.gz", volume() + 1000 * ch)
        else:
            save_nifti(root / "imagesTr" / f"{c}.nii.gz", volume((12, 10, 8, channels)) if channels > 1 else volume())
        save_nifti(root / "labelsTr" / f"{c}.nii.gz", label_map())
        (root / "imagesTr" / f"._{c}.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    if with_json:
        meta = {
            "name": "Hippocampus",
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "modality": {str(i): f"MRI{i}" for i in range(channels)},
            "numTraining": n,
            "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases],
            "test": [],
        }
        (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return cases


def btcv(root: Path, cases: tuple[int, ...] = (1, 2, 5, 6, 7, 9, 10, 21)) -> list[str]:
    """The Synapse download layout ``RawData/Training/{img,label}/{img,label}00NN.nii.gz`` (organ labels 0..13)."""
    for c in cases:
        save_nifti(root / "RawData" / "Training" / "img" / f"img{c:04d}.nii.gz", volume(scale=400) - 200)
        save_nifti(root / "RawData" / "Training" / "label" / f"label{c:04d}.nii.gz", label_map(values=(6, 13)))
    (root / "RawData" / "Testing" / "img").mkdir(parents=True)
    return [f"{c:04d}" for c in cases]


def brats(root: Path, edition: str = "2021", n: int = 4) -> list[str]:
    """Per-case folders: 2021 ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz`` (labels 0,1,2,4),
    2023 ``BraTS-GLI-00000-000/...-{t1n,t1c,t2w,t2f,seg}.nii.gz`` (0..3), 2018 ``HGG/``/``LGG/`` folders."""
    names = []
    for i in range(n):
        if edition == "2023":
            case, sep, mods, et = f"BraTS-GLI-{i:05d}-000", "-", ["t1n", "t1c", "t2w", "t2f"], 3
        else:
            case, sep, mods, et = f"BraTS2021_{i:05d}", "_", ["t1", "t1ce", "t2", "flair"], 4
        folder = root / ("HGG" if i % 2 else "LGG") / case if edition == "2018" else root / case
        for k, m in enumerate(mods):
            save_nifti(folder / f"{case}{sep}{m}.nii.gz", volume() + 100 * k)
        seg_name = "W39_1998.09.19_Segm.nii" if edition == "2021" and i == n - 1 else f"{case}{sep}seg.nii.gz"
        save_nifti(folder / seg_name, label_map(values=(1, 2, et)))
        names.append(case)
    return names


def medmnist(path: Path, dims: int = 3, rgb: bool = False, multilabel: bool = False, n: tuple = (6, 3, 3)) -> Path:
    """A MedMNIST npz: ``{train,val,test}_{images,labels}``, uint8 images (N, H, W[, 3]) or (N, D, H, W)."""
    arrays = {}
    for split, k in zip(("train", "val", "test"), n):
        shape = (k, 28, 28, 28) if dims == 3 else (k, 28, 28, 3) if rgb else (k, 28, 28)
        arrays[f"{split}_images"] = RNG.integers(0, 256, shape, dtype=np.uint8)
        labels = RNG.integers(0, 2, (k, 14)) if multilabel else (np.arange(k) % 2)[:, None]
        arrays[f"{split}_labels"] = labels.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


# ---- generic ----------------------------------------------------------------------------------------
def imagefolder(root: Path, with_val: bool = False) -> None:
    """``{train,[val],test}/<class>/`` with PNG, JPEG and DICOM files."""
    for split in ("train", "val", "test") if with_val else ("train", "test"):
        for cls in ("effusion", "normal"):
            for i in range(6 if split == "train" else 2):
                name = root / split / cls / f"{cls}_{i}"
                if i % 3 == 0:
                    write_dicom(name.with_suffix(".dcm"), xray())
                else:
                    save_png(
                        name.with_suffix(".png" if i % 3 == 1 else ".jpg"), xray(), "PNG" if i % 3 == 1 else "JPEG"
                    )


def image_text_csv(root: Path, n: int = 10) -> pd.DataFrame:
    """``data.csv`` with columns ``filename,findings,cardiomegaly,edema,patient`` and images under ``img/``."""
    recs = []
    for i in range(n):
        save_png(root / "img" / f"{i:03d}.png", xray())
        recs.append(
            {
                "filename": f"img/{i:03d}.png",
                "findings": f"Report {i}: heart size normal.",
                "cardiomegaly": i % 2,
                "edema": int(i % 3 == 0),
                "patient": f"P{i // 2}",
            }
        )
    df = pd.DataFrame(recs)
    df.to_csv(root / "data.csv", index=False)
    return df
