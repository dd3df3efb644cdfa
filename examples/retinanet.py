"""torchvision RetinaNet trained a few steps with its stock sigmoid focal loss and with the fused one.

Two copies of one randomly initialised RetinaNet (ResNet-18 + FPN, weights=None,
weights_backbone=None, small anchors for small images) take the same SGD steps on the same
random images and random boxes, on CPU: the first with torchvision's loss, the second inside
``fused_losses.compat.patch_torchvision()``, which swaps the loss of torchvision's RetinaNet
classification head for the fused kernel. Prints both losses per step and, at the end, the
largest difference between the two models' parameters.

    python examples/retinanet.py                      # 5 steps, 128 x 128 images
    python examples/retinanet.py --steps 3 --image-size 64 --batch-size 2

The two runs differ only in how the classification loss is rounded (float32, a different sum
order), so the losses agree to float32 rounding and the parameters stay close.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Optional, Sequence

import torch
import torchvision
from torchvision.models import resnet18
from torchvision.models.detection import RetinaNet
from torchvision.models.detection import retinanet as tv_retinanet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

try:
    import fused_losses
except ImportError:  # run from a source checkout without installing: use the checkout's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_losses
from fused_losses.compat import patch_torchvision


def build_model(num_classes: int, image_size: int, fpn_channels: int, seed: int) -> RetinaNet:
    """A small RetinaNet: ResNet-18 (C3-C5) + FPN (P3-P7), frozen BN as torchvision's detection
    models use, anchors 8..128 px (scaled for images of ~64-256 px instead of COCO's 32..512)."""
    torch.manual_seed(seed)
    body = resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = BackboneWithFPN(body, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=[128, 256, 512], out_channels=fpn_channels,
                               extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (8, 16, 32, 64, 128))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    return RetinaNet(backbone, num_classes=num_classes, min_size=image_size, max_size=image_size,
                     anchor_generator=anchors)


def random_batch(batch_size: int, image_size: int, num_classes: int, boxes_per_image: int, seed: int):
    """Random images in [0, 1] and 1..boxes_per_image random boxes per image (labels 1..C-1)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, image_size, image_size, generator=g) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        k = int(torch.randint(1, boxes_per_image + 1, (), generator=g))
        wh = image_size * (0.1 + 0.5 * torch.rand(k, 2, generator=g))
        xy = (image_size - wh) * torch.rand(k, 2, generator=g)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, num_classes, (k,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


def train_step(model, optimizer, images, targets) -> dict:
    losses = model(images, targets)
    total = losses["classification"] + losses["bbox_regression"]
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {"classification": float(losses["classification"].detach()),
            "bbox_regression": float(losses["bbox_regression"].detach()),
            "total": float(total.detach())}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="SGD steps (default 5)")
    p.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=21, help="classes including background 0 (default 21)")
    p.add_argument("--boxes", type=int, default=4, help="at most this many random boxes per image (default 4)")
    p.add_argument("--fpn-channels", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"fused_losses backend for CPU tensors: {'cpu' if fused_losses.backends()['cpu'].available else 'reference'}")
    stock = build_model(args.num_classes, args.image_size, args.fpn_channels, args.seed)
    fused = copy.deepcopy(stock)  # same initial weights
    stock.train()
    fused.train()
    opt_stock = torch.optim.SGD(stock.parameters(), lr=args.lr, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=args.lr, momentum=0.9)

    history = {"stock": [], "fused": [], "seconds": {"stock": 0.0, "fused": 0.0}}
    print(f"{'step':>4} | {'cls stock':>12} {'cls fused':>12} {'rel diff':>9} | {'total stock':>12} {'total fused':>12}")
    for step in range(args.steps):
        images, targets = random_batch(args.batch_size, args.image_size, args.num_classes, args.boxes,
                                       seed=args.seed * 100003 + step)
        t0 = time.perf_counter()
        s = train_step(stock, opt_stock, images, targets)
        t1 = time.perf_counter()
        with patch_torchvision():
            assert tv_retinanet.sigmoid_focal_loss is fused_losses.compat.sigmoid_focal_loss
            f = train_step(fused, opt_fused, images, targets)
        t2 = time.perf_counter()
        history["seconds"]["stock"] += t1 - t0
        history["seconds"]["fused"] += t2 - t1
        history["stock"].append(s)
        history["fused"].append(f)
        rel = abs(f["classification"] - s["classification"]) / max(abs(s["classification"]), 1e-30)
        print(f"{step:>4} | {s['classification']:>12.7f} {f['classification']:>12.7f} {rel:>9.2e} | "
              f"{s['total']:>12.7f} {f['total']:>12.7f}")

    max_diff, max_abs = 0.0, 0.0
    for (name, p_s), (_, p_f) in zip(stock.named_parameters(), fused.named_parameters()):
        max_diff = max(max_diff, float((p_s.detach() - p_f.detach()).abs().max()))
        max_abs = max(max_abs, float(p_s.detach().abs().max()))
    history["max_param_diff"] = max_diff
    history["max_param_abs"] = max_abs
    print(f"max |parameter difference| after {args.steps} steps: {max_diff:.3e} (largest |parameter| {max_abs:.3f})")
    print(f"wall time, whole train steps (not a benchmark): stock {history['seconds']['stock']:.2f} s, "
          f"fused {history['seconds']['fused']:.2f} s")
    return history


if __name__ == "__main__":
    main()
