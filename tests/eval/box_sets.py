"""Random detection sets where box matching matters, for the mAP tests."""

from __future__ import annotations

import torch


def random_set(n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Images with 0-3 boxes and 0-5 detections, some near a box (true positives at some IoUs)."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(n):
        k = int(torch.randint(0, 4, (1,), generator=g))
        xy = torch.rand(k, 2, generator=g) * 80
        gt = torch.cat([xy, xy + 10 + torch.rand(k, 2, generator=g) * 20], 1)
        near = gt + torch.randn(k, 4, generator=g) * 4  # jittered copies of the boxes
        xy = torch.rand(2, 2, generator=g) * 80
        far = torch.cat([xy, xy + 15], 1)
        boxes = torch.cat([near, far])[: int(torch.randint(0, 6, (1,), generator=g))]
        boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1)
        preds.append({"boxes": boxes, "scores": torch.rand(len(boxes), generator=g),
                      "labels": torch.zeros(len(boxes), dtype=torch.long)})
        targets.append({"boxes": gt, "labels": torch.zeros(k, dtype=torch.long)})
    return preds, targets
