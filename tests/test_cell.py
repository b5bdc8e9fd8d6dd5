"""A cell is resolved once (``cell.resolve``) and executed by run and bench; ``--dry-run`` shows it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medvlp_bench import bench as bench_mod
from medvlp_bench import cell as cell_mod
from medvlp_bench.cell import resolve
from medvlp_bench.checkpoint import checkpoint_dir
from medvlp_bench.cli import main
from medvlp_bench.config import compose, instantiate
from medvlp_bench.results import ResultRow, write_cell
from medvlp_bench.text import build_text_encoder

ROW = ResultRow(
    method="clip", impl_source="baseline", task="phantom_cxr_cls", task_version=1, kind="classification",
    spatial_dims=2, protocol="linear", label_fraction=0.01, seed=0, metric="auroc", value=0.5,
    higher_is_better=True, primary=True, ckpt_sha256=None, code_version="x", mlflow_run_id=None,
    date="2026-01-01T00:00:00", wall_time_s=1.0, device="cpu", n_test=4,
)  # fmt: skip


def test_a_cell_knows_its_weights_versions_files_and_status(workdir: Path) -> None:
    cell = resolve(["method=clip", "task=phantom_cxr_cls", "task.label_fraction=0.01"])
    assert cell.name == "phantom_cxr_cls__clip__linear__f0.01__s0"
    assert (cell.method, cell.task, cell.kind, cell.corpus) == (
        "clip",
        "phantom_cxr_cls",
        "classification",
        "phantom_cxr",
    )
    assert cell.weights == "pretrain" and cell.checkpoint == checkpoint_dir(cell.cfg)
    assert cell.rows_path == workdir / "results" / "runs" / f"{cell.name}.json"
    assert cell.predictions_path == workdir / "results" / "predictions" / f"{cell.name}.npz"
    mv, tv = cell.versions
    assert cell.status() == "to run" and "to train now" in cell.weights_plan()
    write_cell(cell.runs_dir, cell.name, [replace(ROW, method_version=mv + 1, task_version=tv)])
    assert cell.status() == "stale"
    write_cell(cell.runs_dir, cell.name, [replace(ROW, method_version=mv, task_version=tv)])
    assert cell.status() == "done"
    assert resolve(["method=scratch", "task=phantom_cxr_cls"]).weights == "init"
    with_ckpt = resolve(["method=clip", "task=phantom_cxr_cls", f"ckpt={workdir}"])
    assert (with_ckpt.weights, with_ckpt.checkpoint) == ("ckpt", workdir)


def test_a_cell_the_method_cannot_do_says_why() -> None:
    cell = resolve(["method=brainmvp", "task=phantom_ct_cls"])
    assert cell.status() == "not applicable" and "channels" in (cell.gap or "")


def test_resolving_composes_at_most_twice_and_sizes_follow_to_every_corpus_part(monkeypatch) -> None:
    """The run config once, and once more with a named corpus (UniMedI's joint 2D+3D one); the corpus's layout
    is read once per corpus, not per cell."""
    resolve(["method=unimedi", "task=phantom_ct_cls"])  # warm the corpus-layout cache
    calls: list[list[str]] = []
    real = cell_mod.compose

    def counting(root: str, overrides: list[str] | None = None):
        calls.append(list(overrides or []))
        return real(root, overrides)

    monkeypatch.setattr(cell_mod, "compose", counting)
    cell = resolve(["method=unimedi", "task=phantom_ct_cls", "task.data.size=32"])
    assert len(calls) == 2 and "data=phantom_cxr_ct" in calls[1]
    assert {p.size for p in cell.cfg.data.parts.values()} == {32} and cell.corpus == "phantom_cxr_ct"
    calls.clear()
    resolve(["method=clip", "task=phantom_cxr_cls", "task.data.size=32"])
    assert len(calls) == 1  # the task's own data is its corpus


def test_datamodules_are_complete_when_built() -> None:
    """Batch size, seed and tokenizer are constructor arguments, also for a corpus of parts (batch size and
    tokenizer reach each part; its alternating loader shuffles with Lightning's seeded samplers)."""
    tok = build_text_encoder("bert_tiny").tokenizer
    single = compose("pretrain", ["method=clip", "data=phantom_cxr"]).data
    dm = instantiate(single, batch_size=7, rng_seed=3, tokenizer=tok)
    assert (dm.batch_size, dm.rng_seed, dm.tokenizer) == (7, 3, tok)
    mixed = compose("pretrain", ["method=unimedi", "data=phantom_cxr_ct", "+data.batch_scale.phantom_ct=0.5"]).data
    dm = instantiate(mixed, batch_size=8, rng_seed=3, tokenizer=tok)
    assert {k: p.batch_size for k, p in dm.parts.items()} == {"phantom_cxr": 8, "phantom_ct": 4}
    assert dm.tokenizer is tok and all(p.tokenizer is tok for p in dm.parts.values())


def test_run_dry_run_prints_the_cell_and_does_nothing(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "method=clip", "task=phantom_cxr_cls", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "phantom_cxr_cls__clip__linear__f0.01__s0" in out and "to train now" in out and "status       to run" in out
    assert not (workdir / "results").exists() and not (workdir / "cache").exists()


def test_run_dry_run_fails_on_missing_data_in_seconds(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "method=scratch", "task=rsna_cls", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "rsna" in err.lower() and "task.data.root" in err


def test_results_flag_is_paths_results_dir(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        main(["run", "method=scratch", "task=phantom_cxr_cls", "--dry-run", "--results", str(workdir / "elsewhere")])
        == 0
    )
    assert str(workdir / "elsewhere" / "runs") in capsys.readouterr().out


def test_bench_dry_run_lists_the_grid_with_status(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    ov = ["suite=smoke", "suite.methods=[scratch,brainmvp]", "suite.tasks=[phantom_cxr_cls,phantom_cxr_retrieval]"]
    assert main(["bench", *ov, "suite.seeds=[0]", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("cells in " + str(workdir / "results" / "runs") + ": 1 to run, 3 not applicable")
    assert any(line.startswith("not applicable") and "brainmvp" in line for line in out)
    # a method without a text tower cannot be judged by retrieval: known from its class, before any run
    scratch_retrieval = next(line for line in out if "phantom_cxr_retrieval__scratch__" in line)
    assert scratch_retrieval.startswith("not applicable") and "Scratch has no text tower" in scratch_retrieval


def test_the_text_tower_gap_is_decided_only_for_a_method_class_without_a_checkpoint(workdir: Path) -> None:
    from medvlp_bench.cell import text_gap
    from medvlp_bench.methods.clip import CLIP
    from medvlp_bench.methods.scratch import Scratch

    assert text_gap("retrieval", Scratch) == "Scratch has no text tower (no joint image-text space)"
    assert text_gap("zeroshot", CLIP) is None and text_gap("classification", Scratch) is None
    assert text_gap("retrieval", lambda **kw: CLIP(**kw)) is None  # a factory: the built method decides
    # ckpt= brings the checkpoint's own method config (e.g. a CLIP one): the named method's class does not decide
    assert resolve(["method=scratch", "task=phantom_cxr_retrieval", f"ckpt={workdir}"]).gap is None
    assert not (workdir / "results" / "runs").exists()


def test_a_protocol_list_applies_to_classification_and_keeps_other_kinds() -> None:
    """A suite listing protocols used to drop every segmentation cell (they matched no listed protocol)."""
    cfg = compose("bench", ["suite=smoke"])
    OmegaConf.set_struct(cfg, False)
    cfg.suite.update(methods=["scratch"], tasks=["phantom_cxr_cls", "phantom_cxr_seg"], seeds=[0])
    cfg.suite.update(protocols=["linear", "finetune"], label_fractions=[0.1], tiny=False)
    names = [c.name for c in bench_mod.plan(cfg, [])]
    assert sorted(names) == [
        "phantom_cxr_cls__scratch__finetune__f0.1__s0",
        "phantom_cxr_cls__scratch__linear__f0.1__s0",
        "phantom_cxr_seg__scratch__finetune__f0.1__s0",
    ]


def test_flags_may_come_between_overrides(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "method=scratch", "--dry-run", "task=phantom_cxr_cls", "seed=3"]) == 0
    assert "phantom_cxr_cls__scratch__linear__f0.01__s3" in capsys.readouterr().out


def test_a_results_folder_with_hydra_syntax_in_its_name_stays_a_path(workdir: Path, capsys) -> None:
    """``--results`` and the bench's folder travel as a quoted override: commas, brackets, quotes, ``${}`` stay."""
    odd = workdir / "results (copy),v2 it's ${x}"
    assert main(["run", "method=scratch", "task=phantom_cxr_cls", "--results", str(odd), "--dry-run"]) == 0
    assert str(odd / "runs") in capsys.readouterr().out
    assert main(["bench", "suite=smoke", "suite.methods=[scratch]", "suite.tasks=[phantom_cxr_cls]", "--dry-run",
                 "--results", str(odd)]) == 0  # fmt: skip
    assert capsys.readouterr().out.splitlines()[-1] == f"1 cells in {odd / 'runs'}: 1 to run"


def test_a_task_the_class_refuses_fails_before_pre_training(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """The task is built after the method (it needs the method's tokenizer), so pre-flight builds it first."""
    bad = ["method=clip", "task=phantom_cxr_seg", "task.monitor=auroc"]
    assert main(["run", *bad, "--dry-run"]) == 2
    assert "segmentation monitor must be 'dice' or 'loss'" in capsys.readouterr().err
    assert main(["run", *bad]) == 2  # the real run: the same line, and nothing pre-trained
    assert not list((workdir / "cache").glob("checkpoints/*"))


def test_pretrain_dry_run_checks_what_the_run_would(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", "method=clip", "data=phantom_cxr", "--dry-run"]) == 0
    assert "to train" in capsys.readouterr().out
    assert main(["pretrain", "method=scratch", "data=phantom_cxr", "--dry-run"]) == 2
    assert "no pre-training objective" in capsys.readouterr().err
