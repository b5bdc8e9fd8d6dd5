"""Every config in every group composes and instantiates; bad names and keys fail early and helpfully."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from medvlp_bench.config import (
    ConfigError,
    check_targets,
    compose,
    instantiate,
    options,
    tiny_overrides,
    unmet_requirements,
)
from medvlp_bench.data import MedDataModule
from medvlp_bench.datasets.mixed import MixedDataModule
from medvlp_bench.method import Method
from medvlp_bench.run import make_trainer
from medvlp_bench.task import Task

#: methods built from the task's input; `external` loads a model file (tests/test_external.py)
BUILT_FROM_INPUT = [m for m in options("method") if m != "external"]


@pytest.mark.parametrize("task", options("task"))
def test_every_task_composes_and_instantiates(task: str, workdir) -> None:
    cfg = compose("run", ["method=scratch", f"task={task}"])
    t = instantiate(cfg.task)
    assert isinstance(t, Task) and isinstance(t.data, MedDataModule)
    assert t.primary in t.metrics and t.version
    assert cfg.task.data.spatial_dims in (2, 3)


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_instantiates(data: str, workdir) -> None:
    cfg = compose("pretrain", ["method=scratch", f"data={data}"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, MedDataModule | MixedDataModule)  # a corpus may join several datamodules
    assert dm.spatial_dims == cfg.data.spatial_dims and dm.in_channels == cfg.data.in_channels


@pytest.mark.parametrize("method", BUILT_FROM_INPUT)
@pytest.mark.parametrize("task", ["phantom_cxr_cls", "phantom_ct_cls"])
def test_every_method_builds_for_2d_and_3d(method: str, task: str, workdir) -> None:
    cfg = compose("run", [f"method={method}", f"task={task}", *tiny_overrides(method)])
    if unmet_requirements(cfg.method, cfg.task.data) is not None:
        task = "phantom_mri_cls"  # a method for multi-modal 3D builds for that instead
        cfg = compose("run", [f"method={method}", f"task={task}", *tiny_overrides(method)])
    m = instantiate(cfg.method.model)
    assert isinstance(m, Method) and m.impl_source in ("official-code", "paper", "reimplementation", "baseline")
    assert {"max_epochs", "batch_size"} <= set(cfg.method.pretrain)
    assert "tiny" in cfg.method, f"configs/method/{method}.yaml needs a `tiny:` list of overrides for CPU tests"


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config(trainer: str) -> None:
    cfg = compose("pretrain", ["method=scratch", "data=phantom_cxr", f"trainer={trainer}"])
    if cfg.trainer.accelerator == "gpu":
        assert str(cfg.trainer.precision).startswith("bf16")
        if not torch.cuda.is_available():
            return
    t = make_trainer(cfg.trainer, None, max_epochs=1)
    if trainer == "ddp_cpu":
        assert t.num_devices == 2 and type(t.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("suite", options("suite"))
def test_every_suite_names_existing_methods_and_tasks(suite: str) -> None:
    cfg = compose("bench", [f"suite={suite}"])
    assert set(cfg.suite.methods) <= set(options("method"))
    assert set(cfg.suite.tasks) <= set(options("task"))
    assert len(cfg.suite.seeds) >= 1


def test_unknown_method_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'.*clip.*scratch"):
        compose("run", ["method=nope", "task=phantom_cxr_cls"])


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'task.lrr'.*max_epochs"):
        compose("run", ["method=clip", "task=phantom_cxr_cls", "task.lrr=3"])


def test_missing_method_says_so() -> None:
    with pytest.raises(ConfigError, match="method.*clip"):
        compose("run", ["task=phantom_cxr_cls"])


def test_target_allow_list_blocks_foreign_code() -> None:
    evil = OmegaConf.create({"model": {"_target_": "os.system", "command": "echo pwned"}})
    with pytest.raises(ConfigError, match="os.system"):
        check_targets(evil)
    with pytest.raises(ConfigError):
        instantiate(evil.model)
    check_targets(OmegaConf.create({"_target_": "medvlp_bench.encoders.build_image_encoder"}))


def test_unmet_requirements_names_the_gap() -> None:
    method = OmegaConf.create({"requires": {"spatial_dims": 3, "min_channels": 2}})
    mri = OmegaConf.create({"name": "phantom_mri", "spatial_dims": 3, "in_channels": 4})
    assert unmet_requirements(method, mri) is None
    gap = unmet_requirements(method, OmegaConf.create({"name": "phantom_cxr", "spatial_dims": 2, "in_channels": 1}))
    assert gap == "it pre-trains on 3D data only and phantom_cxr is 2D"
    gap = unmet_requirements(method, OmegaConf.create({"name": "phantom_ct", "spatial_dims": 3, "in_channels": 1}))
    assert gap == "it needs >= 2 channels (modalities) and phantom_ct has 1"
    either = OmegaConf.create({"requires": {"spatial_dims": [2, 3]}})
    assert unmet_requirements(either, OmegaConf.create({"spatial_dims": 2})) is None
    assert unmet_requirements(OmegaConf.create({}), mri) is None  # no requires: anything goes


def test_phantom_sizes_follow_to_a_named_corpus_and_nothing_else_does() -> None:
    from medvlp_bench.cell import resolve

    ov = ["method=unimedi", "task=phantom_ct_cls", "task.data.size=32", "task.data.n_train=48"]
    ov.append("task.data.batch_size=4")
    cfg = resolve(ov).cfg
    assert cfg.names.data == "phantom_cxr_ct"
    assert cfg.data.size == 32 and {p.size for p in cfg.data.parts.values()} == {32}
    assert {p.n_train for p in cfg.data.parts.values()} == {48}
    assert {p.batch_size for p in cfg.data.parts.values()} == {64, 16}  # not a phantom size: the parts' own


@pytest.mark.parametrize(("twin", "method"), [("scratch_swin", "gtgm"), ("scratch_vit", "unimedi")])
def test_scratch_twins_build_the_same_encoder_as_their_method(twin: str, method: str) -> None:
    """The twin configs copy their method's encoder block: this keeps the copies from drifting apart."""
    cfgs = [compose("run", [f"method={m}", "task=phantom_ct_cls"]) for m in (twin, method)]
    assert cfgs[0].method.model.image_encoder == cfgs[1].method.model.image_encoder
    encoder_tiny = [[o for o in c.method.tiny if ".image_encoder." in o] for c in cfgs]
    assert encoder_tiny[0] == encoder_tiny[1]
