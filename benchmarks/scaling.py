"""Samples/s of ``clip`` (ViT-B/16 at 224², BERT-base text tower) at 1-128 GPUs, on paper.

No GPU was available when this was written, so the single-GPU step time is a model, not a measurement:
step FLOPs are counted exactly (``torch.utils.flop_counter`` over one forward + backward on CPU) and divided
by an assumed fraction of the bf16 peak (``--mfu``). Replace ``--step-ms`` with a measured step time from
``benchmarks/throughput.py --device cuda`` when one is available; everything else follows.

Communication per step, with the ring algorithm (time = data x 2(N-1)/N / link bandwidth for all-reduce,
data x (N-1)/N / bandwidth for all-gather):
- DDP gradient all-reduce of every trainable parameter in fp32, bucketed and overlapped with the backward pass;
  the exposed part is ``(1 - overlap)`` of it;
- the contrastive loss's all-gather of image and text embeddings (bf16) and its [B_local x B_global] logits.
Links: NVLink within a node of 8 GPUs, one InfiniBand NIC per GPU across nodes (the ring's slowest link).

    python benchmarks/scaling.py > docs/scaling-table.md
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode


def clip_vit_b16() -> torch.nn.Module:
    from medvlp_bench.encoders import build_image_encoder
    from medvlp_bench.methods.clip import CLIP
    from medvlp_bench.text import build_text_encoder

    image = build_image_encoder("vit_b16", spatial_dims=2, in_channels=1, img_size=224)
    text = build_text_encoder("bert_tiny", hidden=768, layers=12, heads=12, max_length=128)
    return CLIP(image, text, embed_dim=512)


def count(model: torch.nn.Module, batch: int = 2, tokens: int = 128) -> tuple[float, int, int]:
    """(FLOPs per sample for forward + backward, trainable parameters, embedding width)."""
    tok = {
        "input_ids": torch.randint(1000, 2000, (batch, tokens)),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long),
    }
    data = {"image": torch.randn(batch, 1, 224, 224), "text": tok}
    counter = FlopCounterMode(display=False)
    with counter:
        model.pretrain_step(data)["loss"].backward()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counter.get_total_flops() / batch, params, model.embed_dim


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak", type=float, default=989e12, help="bf16 dense FLOP/s (H100 SXM datasheet)")
    ap.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation on one GPU")
    ap.add_argument("--step-ms", type=float, default=None, help="measured single-GPU step time (overrides the model)")
    ap.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    ap.add_argument("--nvlink", type=float, default=450e9, help="bytes/s per GPU within a node (NVLink 4, one way)")
    ap.add_argument("--ib", type=float, default=50e9, help="bytes/s per GPU across nodes (400 Gb/s NDR per GPU)")
    ap.add_argument("--overlap", type=float, default=0.7, help="fraction of the gradient all-reduce hidden by backward")
    ap.add_argument("--latency-us", type=float, default=30.0, help="per collective, per ring step, inter-node")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    flops, params, dim = count(clip_vit_b16())
    t1 = args.step_ms / 1e3 if args.step_ms else flops * args.batch / (args.peak * args.mfu)
    grad_bytes = 4 * params
    print(f"clip ViT-B/16 224² + BERT-base: {flops / 1e9:.1f} GFLOP/sample (fwd+bwd), {params / 1e6:.0f} M params")
    print(
        f"single GPU: batch {args.batch}, step {t1 * 1e3:.0f} ms "
        f"({'measured' if args.step_ms else f'model: {args.mfu:.0%} of {args.peak / 1e12:.0f} TFLOP/s'})"
    )
    print()
    print("| GPUs | global batch | step ms | of which comm. exposed ms | samples/s | scaling efficiency |")
    print("|---|---|---|---|---|---|")
    base = args.batch / t1
    for n in (1, 8, 32, 128):
        bw = args.nvlink if n <= 8 else args.ib
        ring = 2 * (n - 1) / n if n > 1 else 0.0
        lat = (args.latency_us * 1e-6 * 2 * (n - 1)) if n > 8 else 0.0
        allreduce = grad_bytes * ring / bw + lat
        gathered = 2 * (n * args.batch) * dim * 2  # image + text embeddings, bf16
        gather = gathered * ((n - 1) / n) / bw + lat / 2 if n > 1 else 0.0
        logits = 2 * 3 * 2 * args.batch * (n * args.batch) * dim / (args.peak * args.mfu)  # both directions, fwd+bwd
        exposed = (1 - args.overlap) * allreduce + gather
        step = t1 + logits + exposed
        sps = n * args.batch / step
        print(
            f"| {n} | {n * args.batch} | {step * 1e3:.0f} | {exposed * 1e3:.1f} | {sps:,.0f} | {sps / (n * base):.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
