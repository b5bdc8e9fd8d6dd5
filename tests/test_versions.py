"""Method and task versions: the fingerprint lock, its refusal to record an unbumped change, and the
pre-training key. (Stale bench cells: tests/test_bench_cells.py; leaderboard pooling: tests/test_results.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from medvlp_bench import versions
from medvlp_bench.config import compose
from medvlp_bench.methods.clip import CLIP
from medvlp_bench.run import pretrain_key
from medvlp_bench.task import Task


def _edit(monkeypatch: pytest.MonkeyPatch, filename: str, change: Callable[[str], str]) -> None:
    """Make ``versions`` read ``filename`` (a source file or yaml) with ``change`` applied: a simulated edit."""
    real = versions._read
    monkeypatch.setattr(versions, "_read", lambda p: change(real(p)) if Path(p).name == filename else real(p))


def _only(group: str, name: str) -> dict[str, dict[str, versions.Entry]]:
    entry = versions.method_entry(name) if group == "methods" else versions.task_entry(name)
    return {"methods": {}, "tasks": {}, group: {name: entry}}


def test_the_lock_matches_the_sources() -> None:
    """The check itself: a method or task whose sources changed without a version bump fails here."""
    found = versions.problems(versions.read_lock(), versions.current())
    assert not found, "\n".join(found)


def test_an_edit_without_a_bump_is_reported_with_what_to_bump(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = _only("methods", "unimedi")
    _edit(monkeypatch, "clip.py", lambda s: s + "\nEXTRA = 1\n")
    (msg,) = versions.problems(lock, _only("methods", "unimedi"))  # unimedi.py imports CLIP from clip.py
    assert "method 'unimedi'" in msg and "medvlp_bench.methods.clip" in msg
    bump = versions.method_version("medvlp_bench.methods.unimedi.UniMedI") + 1
    assert f"version: ClassVar[int] = {bump}` on medvlp_bench.methods.unimedi.UniMedI" in msg
    assert versions.UPDATE in msg


def test_formatting_comments_and_docstrings_do_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    before = versions.method_entry("clip")

    def reformat(src: str) -> str:
        src = src.replace('"""', '"""Reworded. ', 1)  # the module docstring
        return "# a new comment\n\n" + src.replace("\n\n\n", "\n\n\n\n").replace(":\n", ":  # note\n", 3)

    _edit(monkeypatch, "clip.py", reformat)
    _edit(monkeypatch, "clip.yaml", lambda s: "# comment only\n" + s)
    assert versions.method_entry("clip") == before


def test_task_sources_are_its_yamls_kind_module_and_data_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = versions.task_entry("phantom_cxr_cls")
    assert set(entry.sources) == {
        "configs/task/phantom_cxr_cls.yaml",
        "configs/data/phantom_cxr.yaml",
        "medvlp_bench.tasks.classification",
        "medvlp_bench.tasks._head",  # imported by the kind module: head training shared with segmentation
        "medvlp_bench.datasets.phantoms",
        "medvlp_bench.datasets.phantom_cxr",  # loaded by name in phantoms.py, not by an import
        "medvlp_bench.datasets._phantom_common",
    }
    assert entry.version == 1  # `version: "1"` in the yaml reads as the integer 1
    lock = _only("tasks", "phantom_cxr_cls")
    _edit(monkeypatch, "phantom_cxr_cls.yaml", lambda s: s.replace('version: "1"', "version: 1"))
    assert versions.problems(lock, _only("tasks", "phantom_cxr_cls")) == []  # the version is not a source
    _edit(monkeypatch, "phantom_cxr_cls.yaml", lambda s: s.replace("patience: 10", "patience: 11"))
    (msg,) = versions.problems(lock, _only("tasks", "phantom_cxr_cls"))
    assert "configs/task/phantom_cxr_cls.yaml" in msg and "set `version: 2` in configs/task/phantom_cxr_cls.yaml" in msg


def test_update_refuses_an_unbumped_change_and_records_a_bumped_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_path = tmp_path / "versions.lock.json"
    v = CLIP.version  # the test bumps relative to the current version
    monkeypatch.setattr(versions, "current", lambda: _only("methods", "clip"))
    assert versions.update(lock_path) == []
    recorded = lock_path.read_bytes()
    assert json.loads(recorded)["methods"]["clip"]["version"] == v
    assert versions.main(["--lock", str(lock_path)]) == 0

    _edit(monkeypatch, "clip.py", lambda s: s.replace("local_loss=self.local_loss)", "local_loss=True)", 1))
    assert versions.main(["--lock", str(lock_path)]) == 1
    (refusal,) = versions.update(lock_path)
    assert (
        "method 'clip'" in refusal and f"version: ClassVar[int] = {v + 1}` on medvlp_bench.methods.clip.CLIP" in refusal
    )
    assert lock_path.read_bytes() == recorded  # nothing written: the lock cannot silence the check

    monkeypatch.setattr(CLIP, "version", v + 1)
    assert versions.problems(versions.read_lock(lock_path), _only("methods", "clip")) == [
        f"method 'clip': version {v + 1} is not recorded yet: run `{versions.UPDATE}`"
    ]
    assert versions.update(lock_path) == []
    assert versions.read_lock(lock_path)["methods"]["clip"].version == v + 1
    assert versions.main(["--lock", str(lock_path)]) == 0

    monkeypatch.setattr(CLIP, "version", v)  # a version never goes down
    (refusal,) = versions.update(lock_path)
    assert f"version {v} is below the recorded {v + 1}" in refusal


def test_bumping_a_method_version_changes_the_pretraining_key(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose("pretrain", ["method=clip", "data=phantom_cxr"])
    v1 = pretrain_key(cfg)
    monkeypatch.setattr(CLIP, "version", CLIP.version + 1)
    v2 = pretrain_key(cfg)
    assert v2 != v1
    monkeypatch.setattr(CLIP, "version", CLIP.version + 1)
    assert pretrain_key(cfg) not in (v1, v2)


class _Probe(Task):
    kind = "probe"

    def evaluate(self, method: object, ctx: object) -> object:
        raise NotImplementedError


@pytest.mark.parametrize(("given", "want"), [("1", 1), (2, 2), ("3", 3), (1.0, 1)])
def test_task_versions_are_integers(given: object, want: int) -> None:
    assert _Probe(None, metrics=["acc"], primary="acc", version=given).version == want  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["abc", 0, -1, True, "1.5", None])
def test_a_bad_version_is_a_one_line_error_naming_it(bad: object) -> None:
    with pytest.raises(ValueError, match=r"task version .* is not a positive integer \(versions are 1, 2, 3"):
        _Probe(None, metrics=["acc"], primary="acc", version=bad)  # type: ignore[arg-type]


def test_update_records_a_named_behaviour_preserving_change_without_a_bump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock_path = tmp_path / "versions.lock.json"
    monkeypatch.setattr(versions, "current", lambda: _only("methods", "clip"))
    assert versions.update(lock_path) == []
    recorded = lock_path.read_bytes()
    _edit(monkeypatch, "clip.py", lambda s: s + "\nFASTER = True\n")
    refused = versions.update(lock_path, frozenset({"unimedi"}))  # naming another one silences nothing
    assert len(refused) == 2 and "--unchanged 'unimedi': not a method or task" in refused[0]
    assert "method 'clip'" in refused[1]
    assert lock_path.read_bytes() == recorded
    assert versions.main(["--lock", str(lock_path), "--update", "--unchanged", "clip"]) == 0
    entry = versions.read_lock(lock_path)["methods"]["clip"]
    assert entry.version == CLIP.version and entry == versions.method_entry("clip")
    assert versions.main(["--lock", str(lock_path)]) == 0
    with pytest.raises(SystemExit):  # --unchanged alone would record nothing: refused by the parser
        versions.main(["--lock", str(lock_path), "--unchanged", "clip"])
    (refusal,) = versions.update(lock_path, frozenset({"clip"}))
    assert refusal == "--unchanged 'clip': its sources did not change"
    _edit(monkeypatch, "clip.yaml", lambda s: s.replace("temperature:", "temperature_init:", 1))  # a config edit
    (refusal, _) = versions.update(lock_path, frozenset({"clip"}))
    assert "--unchanged 'clip': its config sources changed (configs/method/clip.yaml)" in refusal
