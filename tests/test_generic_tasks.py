"""The tasks on a user's own data, run as typed in the README on data written here in each reader's layout:
``imagefolder_cls``, ``image_text_{cls,retrieval,zeroshot}`` and ``nifti_folder_seg``; a report-needing method
on a folder without reports fails with the choices, and a label task without label columns names them."""

from __future__ import annotations

from pathlib import Path

import fixtures_writer as fw
import numpy as np
import pandas as pd
import pytest

from medvlp_bench.cell import resolve
from medvlp_bench.config import ConfigError, compose, instantiate, tiny_overrides
from medvlp_bench.datasets._errors import DataError
from medvlp_bench.run import evaluate
from medvlp_bench.tasks.zeroshot import template_prompts

FAST = ["trainer.progress=none", "logger=none", "task.data.num_workers=0", "task.data.batch_size=8"]
CLS = ["task.max_epochs=2", "task.patience=1", "task.batch_size=16"]
CLIP = [
    "method.model.image_encoder.name=resnet_tiny",
    "++method.model.text_encoder.hidden=64",
    "method.model.embed_dim=32",
    "method.pretrain.max_epochs=1",
    "method.pretrain.batch_size=8",
]
FINDINGS = ["effusion", "cardiomegaly"]


def pairs_csv(root: Path, n: int = 40) -> Path:
    """``pairs.csv`` with the default columns ``image,report`` plus 0/1 label columns, images under ``img/``."""
    recs = []
    for i in range(n):
        fw.save_png(root / "img" / f"{i:03d}.png", fw.xray())
        effusion, big_heart = i % 2, int(i % 3 == 0)
        words = ["Small left pleural effusion." if effusion else "No effusion."]
        words += ["The heart is enlarged." if big_heart else "Heart size is normal."]
        recs.append({"image": f"img/{i:03d}.png", "report": " ".join(words), "effusion": effusion,
                     "cardiomegaly": big_heart})  # fmt: skip
    pd.DataFrame(recs).to_csv(root / "pairs.csv", index=False)
    return root


def ct_folder(root: Path, n: int = 10) -> Path:
    """``images/<case>.nii.gz`` + ``masks/<case>.nii.gz`` (labels 0/1)."""
    for i in range(n):
        fw.save_nifti(root / "images" / f"case{i:02d}.nii.gz", fw.volume((16, 16, 16)))
        fw.save_nifti(root / "masks" / f"case{i:02d}.nii.gz", fw.label_map((16, 16, 16), values=(1,)))
    return root


def test_imagefolder_cls_as_typed(tmp_path: Path, workdir: Path) -> None:
    fw.imagefolder(tmp_path / "my_xrays")
    rows = evaluate(resolve(["method=scratch", "task=imagefolder_cls", f"task.data.root={tmp_path / 'my_xrays'}",
                     "task.data.size=32", "method.model.image_encoder.name=resnet_tiny", *FAST, *CLS]))  # fmt: skip
    assert {r.kind for r in rows} == {"classification"} and {r.n_test for r in rows} == {4}
    assert {r.metric for r in rows} == {"auroc", "acc", "f1"}


def test_report_method_on_images_without_reports_says_what_to_choose(tmp_path: Path, workdir: Path) -> None:
    fw.imagefolder(tmp_path / "my_xrays")
    typed = ["method=clip", "task=imagefolder_cls", f"task.data.root={tmp_path / 'my_xrays'}", "task.data.size=32"]
    with pytest.raises(ConfigError, match=r"clip pre-trains on image-report pairs and the corpus 'imagefolder' has no "
                       r"reports: choose one that has them with data=<corpus>"):  # fmt: skip
        evaluate(resolve([*typed, *FAST, *CLIP]))
    assert not list((workdir / "cache").rglob("*.safetensors"))  # refused before any training
    pairs = pairs_csv(tmp_path / "pairs")
    corpus = ["data=image_text_csv", f"data.root={pairs}", "data.csv_name=pairs.csv", "data.size=32"]
    rows = evaluate(resolve([*typed, *corpus, "data.num_workers=0", *FAST, *CLIP, *CLS]))
    assert {r.kind for r in rows} == {"classification"} and rows[0].ckpt_sha256  # pre-trained on the chosen pairs


def test_image_text_tasks_as_typed(tmp_path: Path, workdir: Path) -> None:
    pairs = pairs_csv(tmp_path / "pairs")
    typed = ["method=clip", f"task.data.root={pairs}", "task.data.csv_name=pairs.csv", "task.data.size=32"]
    rows = evaluate(resolve(["task=image_text_retrieval", *typed, *FAST, *CLIP]))
    assert {r.kind for r in rows} == {"retrieval"} and rows[0].n_test == 4  # 80/10/10 of 40 pairs
    labels = "task.data.label_cols=[effusion,cardiomegaly]"
    same = ["data=image_text_csv", f"data.root={pairs}", "data.csv_name=pairs.csv", "data.size=32"]  # one pre-training
    rows = evaluate(resolve(["task=image_text_zeroshot", *typed, labels, *same, *FAST, *CLIP]))
    assert {r.kind for r in rows} == {"zeroshot"} and "auroc/effusion" in {r.metric for r in rows}
    rows = evaluate(resolve(["task=image_text_cls", *typed, labels, *same, *FAST, *CLIP, *CLS]))
    assert {r.kind for r in rows} == {"classification"} and "auroc/cardiomegaly" in {r.metric for r in rows}


@pytest.mark.parametrize("task", ["image_text_cls", "image_text_zeroshot"])
def test_label_tasks_without_label_columns_name_the_columns(task: str, tmp_path: Path, workdir: Path) -> None:
    pairs = pairs_csv(tmp_path / "pairs", n=4)
    cfg = compose("run", ["method=scratch", f"task={task}", f"task.data.root={pairs}", "task.data.csv_name=pairs.csv"])
    t = instantiate(cfg.task)
    want = r"pairs\.csv: this task needs label columns: name them with task\.data\.label_cols=\[\.\.\.\] "
    with pytest.raises(DataError, match=want + r".*\['image', 'report', 'effusion', 'cardiomegaly'\]"):
        t.class_prompt_lists() if task == "image_text_zeroshot" else t.data.subset_ids(1.0, 0)


def test_zeroshot_prompts_from_templates() -> None:
    templates = {"positive": ["{}", "there is {}"], "negative": ["no {}"]}
    got = template_prompts(templates, ["pleural_effusion", "edema"], "multilabel")
    assert got == {
        "pleural_effusion": {
            "positive": ["pleural effusion", "there is pleural effusion"],
            "negative": ["no pleural effusion"],
        },  # fmt: skip
        "edema": {"positive": ["edema", "there is edema"], "negative": ["no edema"]},
    }
    assert template_prompts(templates, ["normal", "covid"], "multiclass")["covid"] == ["covid", "there is covid"]


def test_nifti_folder_seg_as_typed(tmp_path: Path, workdir: Path) -> None:
    ct = ct_folder(tmp_path / "my_ct")
    seg = ["task.data.size=24", "task.max_epochs=1", "task.patience=1", "task.batch_size=2", *FAST]
    rows = evaluate(resolve(["method=scratch", "task=nifti_folder_seg", f"task.data.root={ct}", *seg,
                     "method.model.image_encoder.name=resnet_tiny"]))  # fmt: skip
    assert {r.kind for r in rows} == {"segmentation"} and rows[0].spatial_dims == 3
    assert {r.metric for r in rows} == {"dice", "dice/foreground"} and np.isfinite([r.value for r in rows]).all()


@pytest.mark.slow
def test_gtgm_on_nifti_folder_seg_as_typed(tmp_path: Path, workdir: Path) -> None:
    """GTGM pre-trains on the folder's own training volumes (it writes its own text), then segments."""
    ct = ct_folder(tmp_path / "my_ct")
    rows = evaluate(resolve(["method=gtgm", "task=nifti_folder_seg", f"task.data.root={ct}", "task.data.size=32",
                     "task.max_epochs=1", "task.patience=1", "task.batch_size=2", "method.pretrain.max_epochs=1",
                     "method.pretrain.batch_size=2", *FAST, *tiny_overrides("gtgm")]))  # fmt: skip
    assert {r.kind for r in rows} == {"segmentation"} and rows[0].ckpt_sha256
