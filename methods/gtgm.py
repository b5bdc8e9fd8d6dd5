"""``gtgm``: GTGM (arXiv 2306.04811; official code ydchen0806/GTGM), generated text for 3D volumes.

Volumes come without reports, so text is generated from the pixels (``gtgm_textgen``: the offline ``describe``
backend by default, or a local Hugging Face captioner/LM) once per volume and cached on disk. Per step, two
views v1, v2 of each volume (``gtgm_views``: random crop, then one of flip / rotation / intensity / noise / blur)
go through the Swin trunk and the released pre-training head (``GTGMHead``: the ``encoder10`` residual conv
block on the deepest stage, global average pooling, a Linear to ``head_dim`` = 2048), giving h1, h2. Both
h's are projected (Linear -> BN -> ReLU -> Linear -> non-affine BN) next to the projected text t:

    L = CLIP(P(h1), t) + CLIP(P(h2), t) + bt_weight * BT(h1, h2)

CLIP is the symmetric InfoNCE at a fixed temperature, summed over both directions (the released code adds
image->text and text->image cross-entropies); negatives are gathered across ranks (the released code uses
per-GPU negatives only). BT is the released code's Barlow-Twins term on the raw head outputs:
C = h1^T h2 / N, BT = (sum_i (1 - C_ii)^2 + w * sum_{i != j} C_ij^2) / 2, w = 0.0051; ``bt_standardize``
switches to the Barlow Twins paper's batch-standardised form (``losses.barlow_twins``).

The head is pre-training only, like the projections: probes and decoders read the trunk (``encode_image``,
``image_features``), exactly as they read ``scratch_swin``'s, so the comparison is about the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from monai.networks.blocks import UnetrBasicBlock
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from medvlp_bench import distributed
from medvlp_bench.encoders import ImageEncoder
from medvlp_bench.losses import barlow_twins, clip_loss
from medvlp_bench.methods.gtgm_textgen import TextSource, build_generator
from medvlp_bench.methods.gtgm_views import ViewMaker
from medvlp_bench.methods.two_tower import TwoTower
from medvlp_bench.text import TextEncoder
from medvlp_bench.types import Batch

log = logging.getLogger(__name__)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """GTGM's head: Linear -> BN -> ReLU -> Linear -> BN without affine parameters."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
        nn.BatchNorm1d(out_dim, affine=False),
    )


def cross_correlation_loss(z1: Tensor, z2: Tensor, off_diagonal_weight: float = 0.0051, standardize: bool = False):
    """GTGM's Barlow-Twins term over the gathered batch (see the module docstring for the formula)."""
    if standardize:
        return barlow_twins(z1, z2, off_diagonal_weight)
    z1, z2 = distributed.gather_with_grad(z1), distributed.gather_with_grad(z2)
    c = z1.float().T @ z2.float() / z1.shape[0]
    diag = torch.diagonal(c)
    on = (diag - 1).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return (on + off_diagonal_weight * off) / 2


class GTGMHead(nn.Module):
    """The released pre-training head (``SwinUNETR(for_pretrain=True)``: ``encoder10`` then ``head()``).

    ``encoder10`` is MONAI's residual ``UnetrBasicBlock`` (3x3 conv, norm, LeakyReLU, 3x3 conv, norm, + input,
    LeakyReLU) on the deepest, LayerNorm-ed Swin stage; ``head()`` averages it over space and maps it with a
    Linear to ``out_dim`` (2048). Attribute names follow the release, so ``medbench convert gtgm`` loads
    ``encoder.encoder10.*`` and ``encoder.linear.*`` into ``image_head.*`` by name.

    ``norm``: ``instance`` as released (its 32x160x160 input leaves a 1x5x5 map); instance statistics over a
    single voxel are undefined, so a map of one voxel (a 32^3 input) needs ``batch``.
    """

    def __init__(self, spatial_dims: int, channels: int, out_dim: int = 2048, norm: str = "instance") -> None:
        super().__init__()
        self.norm = norm
        self.encoder10 = UnetrBasicBlock(spatial_dims, channels, channels, 3, 1, norm, res_block=True)
        self.linear = nn.Linear(channels, out_dim)
        self.out_dim = out_dim

    def forward(self, deepest: Tensor) -> Tensor:
        if self.norm == "instance" and deepest.shape[2:].numel() == 1:
            raise ValueError(
                f"method.model.head_norm=instance needs a deepest map of more than one voxel, got "
                f"{tuple(deepest.shape[2:])} (crops of at most 32 voxels a side); set method.model.head_norm=batch"
            )
        return self.linear(self.encoder10(deepest).flatten(2).mean(-1))


class GTGM(TwoTower):
    """GTGM on a MONAI Swin trunk and a BERT-family text tower, through ``TwoTower``'s towers with the released
    head between the trunk and the image projection, GTGM's BN projections and a fixed temperature.

    Args:
        textgen: text generation settings: ``backend`` (describe | hf), ``seed``, ``cache_dir`` (None: no disk
            cache), ``context`` (overrides of the measurement context) and ``hf`` (HFGenerator arguments).
        head_dim: output width of the released head (2048), the features of the projection and the BT term.
        head_norm: the head's ``encoder10`` normalisation (``instance`` as released, ``batch``, ...: MONAI names).
        proj_hidden: hidden width of both projection heads (2048 in the paper); ``embed_dim`` is the output (512).
        temperature: fixed CLIP temperature (0.07, not learned).
        bt_weight, bt_off_diagonal, bt_standardize: the Barlow-Twins term's weight (0.01), off-diagonal weight
            (0.0051) and form (raw cross-correlation as released, or batch-standardised).
        views: ``ViewMaker`` settings (crop_fraction, perturbations, pick, prob, flip_prob, intensity_scale,
            intensity_shift, noise_std, blur_sigma); flips and rotations spare axes the text names directions
            along.
    """

    impl_source: ClassVar[str] = "official-code"
    #: 2: the released head (BT and projection on its output), released text freezing and views
    version: ClassVar[int] = 2
    learned_temperature: ClassVar[bool] = False

    def __init__(
        self,
        image_encoder: ImageEncoder,
        text_encoder: TextEncoder,
        *,
        textgen: Mapping[str, Any] | None = None,
        head_dim: int = 2048,
        head_norm: str = "instance",
        proj_hidden: int = 2048,
        temperature: float = 0.07,
        bt_weight: float = 0.01,
        bt_off_diagonal: float = 0.0051,
        bt_standardize: bool = False,
        views: Mapping[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        head = GTGMHead(image_encoder.spatial_dims, image_encoder.out_dim, head_dim, head_norm)
        super().__init__(
            image_encoder, text_encoder, temperature=temperature, proj_hidden=proj_hidden, image_head=head, **kw
        )
        self.bt_weight = float(bt_weight)
        self.bt_off_diagonal, self.bt_standardize = float(bt_off_diagonal), bool(bt_standardize)
        cfg = OmegaConf.to_container(textgen, resolve=True) if isinstance(textgen, DictConfig) else textgen
        self.textgen_cfg: dict[str, Any] = dict(cfg or {})
        vcfg = OmegaConf.to_container(views, resolve=True) if isinstance(views, DictConfig) else views
        self.views_cfg: dict[str, Any] = dict(vcfg or {})
        ViewMaker(image_encoder.spatial_dims, **self.views_cfg)  # bad settings fail at build time, not mid-fit
        self._views: ViewMaker | None = None
        self._source: TextSource | None = None
        self._texts: dict[str, str] = {}

    # ---- joint space ---------------------------------------------------------------------------
    def projection(self, in_dim: int, hidden: int | None) -> nn.Module:
        """GTGM's projection (``projection_head``: Linear -> BN -> ReLU -> Linear -> non-affine BN)."""
        return projection_head(in_dim, hidden, self.embed_dim)

    def head_features(self, image: Tensor) -> Tensor:
        """[B, head_dim] released head output: the features the projection and the Barlow-Twins term see."""
        return self.image_head(self.image_features(image).maps[-1])

    def joint_image_features(self, image: Tensor) -> Tensor:
        """The released head's output (``head_features``), not the trunk's pooled feature."""
        return self.head_features(image)

    # ---- generated text ------------------------------------------------------------------------
    @property
    def text_source(self) -> TextSource:
        """Generator + cache; built for the fitted datamodule in ``on_fit_start``, else with a generic context."""
        if self._source is None:
            self._source = TextSource(build_generator(self.textgen_cfg), self.textgen_cfg.get("cache_dir"))
        return self._source

    def on_fit_start(self) -> None:
        """Generate (or read from the cache) the text of every training and validation volume, un-augmented.

        The datamodule augments batches on the device before ``pretrain_step`` sees them, so texts are made
        here from the raw datasets. Ranks share the generation and then read each other's texts from the cache.
        """
        dm = getattr(self.trainer, "datamodule", None)
        self._source = TextSource(build_generator(self.textgen_cfg, dm), self.textgen_cfg.get("cache_dir"))
        self._views = None  # rebuilt for this corpus's direction words
        if dm is None or not hasattr(dm, "dataset"):
            return
        datasets = []
        for split in ("train", "val"):
            try:
                datasets.append(dm.dataset(split))
            except ValueError:  # an empty split
                continue
        rank, world = self.trainer.global_rank, self.trainer.world_size
        shared = world > 1 and self._source.cache is not None
        if shared:
            for ds in datasets:
                for i in range(rank, len(ds), world):
                    self._text_of(ds[i])
            self.trainer.strategy.barrier("gtgm_text")
        for ds in datasets:
            for i in range(len(ds)):
                sample = ds[i]
                self._texts[str(sample["id"])] = self._text_of(sample)
        log.info("gtgm: %d texts ready (%d generated now)", len(self._texts), self._source.generated)

    def _text_of(self, sample: Mapping[str, Any]) -> str:
        image = sample["image"]
        image = image.detach().float().cpu().numpy() if isinstance(image, Tensor) else image
        return self.text_source.text(image, str(sample["id"]))

    def proxy_texts(self, batch: Batch) -> dict[str, Tensor]:
        """GTGM is judged on the text it trains on: each volume's generated text, not a corpus report."""
        return {k: v.to(self.device) for k, v in self.text_encoder.tokenizer(self.texts_for(batch)).items()}

    def texts_for(self, batch: Batch) -> list[str]:
        """The generated text of each volume in the batch; volumes not prepared in ``on_fit_start`` (no
        datamodule, or a direct call) get theirs from the batch image, which is augmented during training."""
        out = []
        for i, vid in enumerate(batch["id"]):
            if vid not in self._texts:
                if self._trainer is not None and self._trainer.training:
                    log.warning("gtgm: no prepared text for %s; generating it from the augmented batch image", vid)
                self._texts[vid] = self._text_of({"image": batch["image"][i], "id": vid})
            out.append(self._texts[vid])
        return out

    # ---- views -----------------------------------------------------------------------------------
    @property
    def view_maker(self) -> ViewMaker:
        """Built on first use: the axes the text names directions along are only known once texts are set up."""
        if self._views is None:
            fixed = self.text_source.generator.oriented_axes()
            self._views = ViewMaker(self.image_encoder.spatial_dims, **self.views_cfg, fixed_axes=fixed)
        return self._views

    def view(self, image: Tensor) -> Tensor:
        """One view per sample (``gtgm_views``); in eval mode the centre crop only, so val losses compare."""
        return self.view_maker(image, train=self.training)

    # ---- objective -------------------------------------------------------------------------------
    def pretrain_step(self, batch: Batch) -> dict[str, Tensor]:
        tok = {k: v.to(self.device) for k, v in self.text_encoder.tokenizer(self.texts_for(batch)).items()}
        txt = self.embed_text(tok)
        h1, h2 = self.head_features(self.view(batch["image"])), self.head_features(self.view(batch["image"]))
        scale = 1.0 / self.temperature
        # open_clip's ClipLoss averages the two directions; the released code adds them
        clip1 = 2 * clip_loss(self.project_image(h1), txt, scale)
        clip2 = 2 * clip_loss(self.project_image(h2), txt, scale)
        bt = cross_correlation_loss(h1, h2, self.bt_off_diagonal, self.bt_standardize)
        loss = clip1 + clip2 + self.bt_weight * bt
        return {"loss": loss, "clip_view1": clip1.detach(), "clip_view2": clip2.detach(), "barlow_twins": bt.detach()}
