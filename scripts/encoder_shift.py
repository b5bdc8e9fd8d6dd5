"""Print how far pre-training moved each cached checkpoint's image encoder from its seeded initialisation.

New checkpoints record this as ``encoder_shift`` in their config.json; this recomputes it for any checkpoint
(older ones included) by re-instantiating the method with the checkpoint's seed, which reproduces the
initialisation the pre-training started from. An unrelated random init would give about 1.4 (sqrt 2), so a
value near that means the seeded rebuild did not reproduce the start and the number is meaningless.

    python scripts/encoder_shift.py [cache/checkpoints]
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from omegaconf import OmegaConf

from medvlp_bench.checkpoint import is_checkpoint, read_config, relative_shift, snapshot
from medvlp_bench.config import instantiate  # behind the _target_ allow-list
from medvlp_bench.run import load_method


def main(root: Path) -> int:
    folders = sorted(p for p in root.iterdir() if is_checkpoint(p))
    if not folders:
        print(f"no checkpoints under {root}", file=sys.stderr)
        return 2
    print("checkpoint\tepochs\tsteps\tencoder_shift")
    for folder in folders:
        cfg = read_config(folder)
        L.seed_everything(int(cfg.get("seed", 0)), verbose=False)
        start = snapshot(instantiate(OmegaConf.create(cfg["model"])).image_encoder)
        shift = relative_shift(start, load_method(folder).image_encoder)
        print(f"{folder.name}\t{cfg.get('epochs')}\t{cfg.get('steps')}\t{shift:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "cache/checkpoints")))
