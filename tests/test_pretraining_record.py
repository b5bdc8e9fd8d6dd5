"""``scripts/pretraining_record.py``: the rows' checkpoints, joined by sha256, with proxy curves and wall time."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import load_script
from test_report import _row

from medvlp_bench.results import write_cell


def _script():
    return load_script("scripts/pretraining_record.py")


def test_record_joins_rows_to_checkpoints_and_names_the_missing(tmp_path: Path) -> None:
    res, cache = tmp_path / "results", tmp_path / "cache"
    for seed, sha in ((0, "aaa"), (1, "bbb")):
        row = _row("clip", 0.1, seed, "auroc", 0.7, True)
        row.ckpt_sha256 = sha
        write_cell(res / "runs", f"cell{seed}", [row])
    curve = [{"epoch": -1, "i2t_r10": 0.03}, {"epoch": 0, "i2t_r10": 0.2}]
    proxy = {"values": {"i2t_r10": 0.2}, "reference": {"chance_r10": 0.03}, "learned": True, "curve": curve}
    info = {"method": "clip", "data": "phantom_cxr", "seed": 0, "epochs": 1, "steps": 5, "weights_sha256": "aaa",
            "wall_time_s": 90.0, "encoder_shift": 0.1, "model": {"big": "config"}, "proxy": proxy}  # fmt: skip
    for name, payload in (("clip_s0", info), ("other", {**info, "weights_sha256": "zzz"})):
        (cache / name).mkdir(parents=True)
        (cache / name / "config.json").write_text(json.dumps(payload))
        (cache / name / "model.safetensors").write_bytes(b"")
    assert _script().main(["--results", str(res), "--cache", str(cache)]) == 0
    data = json.loads((res / "pretraining.json").read_text())
    (rec,) = data["checkpoints"]  # only the checkpoint the rows name; the unrelated one is left out
    assert rec["checkpoint"] == "clip_s0" and rec["proxy"]["curve"] == curve and "model" not in rec
    assert data["missing"] == ["bbb"]
    md = (res / "pretraining.md").read_text()
    assert "| clip | phantom_cxr | 0 | 1 | 5 | 1.5 | 0.100 | i2t_r10 0.200 | chance_r10 0.030 | True |" in md
    assert "-1: 0.030; 0: 0.200" in md and "Not in the cache (1 checkpoints the rows name): bbb" in md


def test_a_record_survives_its_checkpoint_leaving_the_cache(tmp_path: Path) -> None:
    """The cache is not committed: a rerun on a fresh checkout keeps the committed record of what the rows name."""
    res, cache = tmp_path / "results", tmp_path / "cache"
    row = _row("clip", 0.1, 0, "auroc", 0.7, True)
    row.ckpt_sha256 = "aaa"
    write_cell(res / "runs", "cell0", [row])
    old = {"checkpoint": "clip_s0", "method": "clip", "data": "phantom_cxr", "seed": 0, "weights_sha256": "aaa",
           "proxy": {"values": {"i2t_r10": 0.2}, "learned": True}}  # fmt: skip
    gone = {**old, "checkpoint": "clip_s9", "weights_sha256": "old"}  # its rows were replaced: not kept
    (res / "pretraining.json").write_text(json.dumps({"checkpoints": [old, gone], "missing": []}))
    assert _script().main(["--results", str(res), "--cache", str(cache)]) == 0  # no cache at all
    data = json.loads((res / "pretraining.json").read_text())
    assert data == {"checkpoints": [old], "missing": []}


def test_a_checkpoint_in_neither_cache_nor_record_is_recorded_from_its_run_files(tmp_path: Path) -> None:
    """A lane whose machine (and cache) is gone: the rows' ``pretraining`` block is the record, less the curve."""
    res = tmp_path / "results"
    block = {"encoder_shift": 0.078, "wall_time_s": 1947.4,
             "proxy": {"kind": "retrieval", "values": {"i2t_r10": 0.083}, "reference": {"chance_r10": 0.083},
                       "learned": False}, "learned": False}  # fmt: skip
    config = {"seed": 1, "data": {"name": "phantom_mri"}, "method": {"pretrain": {"max_epochs": 10}}}
    for protocol in ("f0.01", "f0.1"):  # two cells from one checkpoint: one record
        row = _row("gtgm", 0.1, 1, "auroc", 0.52, True)
        row.ckpt_sha256 = "ccc"
        write_cell(res / "runs", f"mri__{protocol}", [row], {"pretraining": block, "config": config})
    unrelated = _row("scratch", 0.1, 1, "auroc", 0.5, True)  # no checkpoint, no pretraining block: no record
    write_cell(res / "runs", "scratch", [unrelated])
    assert _script().main(["--results", str(res), "--cache", str(tmp_path / "no-cache")]) == 0
    data = json.loads((res / "pretraining.json").read_text())
    (rec,) = data["checkpoints"]
    assert data["missing"] == []
    assert (rec["method"], rec["data"], rec["seed"], rec["epochs"]) == ("gtgm", "phantom_mri", 1, 10)
    assert rec["proxy"]["learned"] is False and rec["weights_sha256"] == "ccc"
    md = (res / "pretraining.md").read_text()
    assert "| gtgm | phantom_mri | 1 | 10 | — | 32.5 | 0.078 | i2t_r10 0.083 | chance_r10 0.083 | False |" in md
    assert "gtgm on phantom_mri, seed 1: no curve (the checkpoint left the cache" in md


def test_run_files_never_override_a_better_record_and_do_not_guess_a_given_checkpoints_corpus(tmp_path: Path) -> None:
    res = tmp_path / "results"
    block = {"proxy": {"values": {"i2t_r10": 0.5}, "learned": True}, "learned": True}
    own = {"seed": 2, "data": {"name": "phantom_cxr"}, "method": {"pretrain": {"max_epochs": 10}}}
    given = {**own, "ckpt": "/models/clip_release"}  # evaluated from a checkpoint this grid did not train
    for name, sha, cfg in (("kept", "aaa", own), ("given", "ddd", given)):
        row = _row("clip", 0.1, 2, "auroc", 0.7, True)
        row.ckpt_sha256 = sha
        write_cell(res / "runs", name, [row], {"pretraining": block, "config": cfg})
    curve = [{"epoch": -1, "i2t_r10": 0.03}, {"epoch": 9, "i2t_r10": 0.5}]
    old = {"checkpoint": "clip_s2", "method": "clip", "data": "phantom_cxr", "seed": 2, "weights_sha256": "aaa",
           "proxy": {"values": {"i2t_r10": 0.5}, "learned": True, "curve": curve}}  # fmt: skip
    (res / "pretraining.json").write_text(json.dumps({"checkpoints": [old], "missing": []}))
    assert _script().main(["--results", str(res), "--cache", str(tmp_path / "none")]) == 0
    recs = {r["weights_sha256"]: r for r in json.loads((res / "pretraining.json").read_text())["checkpoints"]}
    assert recs["aaa"] == old  # the earlier record, with its curve, wins over the rows' block
    assert recs["ddd"]["checkpoint"] == "ckpt=/models/clip_release (from the run files)"
    assert (recs["ddd"]["data"], recs["ddd"]["seed"], recs["ddd"]["epochs"]) == (None, None, None)
    assert "| clip | — | — | — | — |" in (res / "pretraining.md").read_text()


def test_record_without_rows_says_what_to_run(tmp_path: Path, capsys) -> None:
    assert _script().main(["--results", str(tmp_path)]) == 2
    assert "medbench bench" in capsys.readouterr().err
