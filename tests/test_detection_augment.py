"""Detection augmentation: seeded scale jitter moves boxes and masks with the pixels (synthetic rectangles drawn
into images), repeats from (seed, epoch, index), leaves the flips as they were, and is checked in the config."""

from __future__ import annotations

import pytest
import torch

from featkd.data import DataConfig, build_data
from featkd.data.augment import AugmentSpec
from featkd.data.config import ScenesConfig
from featkd.data.detection import DetectionSplit, DetectionTrainLoader, draw_jitter, scale_jitter
from featkd.errors import ConfigError

H, W = 64, 80  # not square: the two axes scale by different exact factors round(H s) / H, round(W s) / W
RECTS = [  # per image: (y1, y2, x1, x2) in pixels, bright rectangles on black; some touch the border
    [(4, 20, 6, 30), (30, 60, 40, 78)],
    [(0, 12, 0, 16), (40, 64, 50, 80)],
    [(10, 50, 20, 60)],
    [(20, 28, 8, 72), (34, 46, 30, 42)],
]


def rect_split() -> DetectionSplit:
    images = torch.zeros(len(RECTS), 3, H, W, dtype=torch.uint8)
    boxes, masks = [], []
    for i, rects in enumerate(RECTS):
        m = torch.zeros(len(rects), H, W, dtype=torch.uint8)
        for k, (y1, y2, x1, x2) in enumerate(rects):
            images[i, :, y1:y2, x1:x2] = 255
            m[k, y1:y2, x1:x2] = 1
        boxes.append(torch.tensor([[x1, y1, x2, y2] for y1, y2, x1, x2 in rects], dtype=torch.float32))
        masks.append(m)
    n = [len(r) for r in RECTS]
    area = [(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes]
    return DetectionSplit(images, boxes, [torch.arange(1, k + 1) for k in n], [torch.zeros(k, dtype=torch.bool)
                          for k in n], area, torch.arange(len(RECTS)), masks)


def mask_box(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_jittered_boxes_and_masks_match_the_drawn_pixels():
    split = rect_split()
    loader = DetectionTrainLoader(split, AugmentSpec(hflip=True), 4, seed=3, scale_jitter=(0.6, 1.6))
    seen_scales = []
    for epoch in range(6):
        loader.set_epoch(epoch)
        seen_scales += draw_jitter(len(split), (0.6, 1.6), seed=3, epoch=epoch).scales.tolist()
        for x, ys in loader:
            assert x.shape == (4, 3, H, W) and x.dtype == torch.float32
            for image, t in zip(x, ys, strict=True):
                bright = image[0] > 0.6  # well above half: an edge pixel centred on a box edge is 127.5 / 255
                n = len(t["boxes"])
                assert {k: len(t[k]) for k in ("labels", "iscrowd", "area", "masks")} == dict.fromkeys(
                    ("labels", "iscrowd", "area", "masks"), n)
                assert t["masks"].shape[1:] == (H, W) and t["masks"].dtype == torch.uint8
                covered = torch.zeros(H, W, dtype=torch.bool)
                for box, mask in zip(t["boxes"], t["masks"], strict=True):
                    x1, y1, x2, y2 = box.tolist()
                    assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
                    # the mask is the rectangle scaled identically: its pixel box is the box, rounded
                    assert mask_box(mask) == pytest.approx([x1, y1, x2, y2], abs=1.0)
                    # the drawn pixels inside it are bright, and the box bounds them
                    assert (image[0][mask.bool()] > 0.4).float().mean() > 0.97
                    covered |= mask.bool()
                # every bright pixel belongs to an annotation, but for the sub-pixel slivers (at the border) of
                # those the crop cut to under MIN_BOX_SIDE and dropped
                ys_, xs_ = torch.nonzero(bright & ~covered, as_tuple=True)
                assert all(y in (0, H - 1) or x in (0, W - 1) for y, x in zip(ys_.tolist(), xs_.tolist()))
    assert min(seen_scales) < 0.8 and max(seen_scales) > 1.3  # shrunk and padded, enlarged and cropped


def test_one_jitter_by_hand_crop_and_pad():
    split = rect_split()
    images, targets = split.targets(torch.device("cpu"))
    t = targets[2]  # one rectangle x 20..60, y 10..50
    big, bt = scale_jitter(images[2], t, 1.5, (0.0, 1.0))  # 96 x 120, window at y 0, x 40
    assert bt["boxes"].tolist() == [[0.0, 15.0, 50.0, 64.0]]  # x: 30..90 - 40 -> clipped at 0; y: 15..75 -> 64
    assert bt["area"].item() == pytest.approx(1600 * 2.25 * (50 * 49) / (60 * 60))
    assert torch.equal(bt["masks"][0].bool(), big[0] > 127)
    small, st = scale_jitter(images[2], t, 0.5, (0.5, 0.0))  # 32 x 40 placed at y 16, x 0
    assert st["boxes"].tolist() == [[10.0, 21.0, 30.0, 41.0]]
    assert torch.equal(st["masks"][0].bool(), small[0] > 127) and int(small[:, :16].max()) == 0
    image = images[2]
    same, same_t = scale_jitter(image, t, 1.004, (0.3, 0.7))  # rounds to the same size: untouched
    assert same is image and same_t is t
    _, gt = scale_jitter(images[0], targets[0], 1.6, (1.0, 1.0))  # window at the bottom right corner
    assert gt["labels"].tolist() == [2] and gt["masks"].shape == (1, H, W)  # the top-left rectangle cut away


def test_jitter_repeats_from_seed_epoch_and_index_and_leaves_the_flips():
    split = rect_split()

    def batches(seed, epoch, jitter, batch=2):
        loader = DetectionTrainLoader(split, AugmentSpec(hflip=True), batch, seed=seed, scale_jitter=jitter)
        loader.set_epoch(epoch)
        return [(x, [{k: v.clone() for k, v in t.items()} for t in ys]) for x, ys in loader]

    def same(a, b):
        return all(torch.equal(xa, xb) and all(ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
                                               for ta, tb in zip(ya, yb, strict=True))
                   for (xa, ya), (xb, yb) in zip(a, b, strict=True))

    a = batches(7, 1, (0.8, 1.25))
    assert same(a, batches(7, 1, (0.8, 1.25)))  # a second loader, same seed and epoch
    assert not same(a, batches(7, 2, (0.8, 1.25))) and not same(a, batches(8, 1, (0.8, 1.25)))
    # a function of the sample index, not of the batch: batch 4 holds the same samples as batches of 2
    by_id = {int(t["image_id"]): (x, t) for xs, ys in a for x, t in zip(xs, ys, strict=True)}
    for xs, ys in batches(7, 1, (0.8, 1.25), batch=4):
        for x, t in zip(xs, ys, strict=True):
            assert torch.equal(by_id[int(t["image_id"])][0], x)
    # factor 1 is the identity, and the flips are those of the run without jitter (their own stream)
    assert same(batches(7, 1, (1.0, 1.0)), batches(7, 1, None))
    table = draw_jitter(1000, (0.8, 1.25), seed=0, epoch=0)
    assert table.scales.min() >= 0.8 and table.scales.max() <= 1.25
    assert abs(float(table.scales.log().mean())) < 0.01  # log-uniform: centred on factor 1 for [0.8, 1.25]


def test_scale_jitter_config(tmp_path, fashion_mnist_dir):
    with pytest.raises(ConfigError, match=r"data.scale_jitter: must be null or \[lo, hi\]"):
        DataConfig(dataset="scenes-det", scale_jitter=[1.2, 0.8]).validate()
    with pytest.raises(ConfigError, match=r"data.scale_jitter: only detection sets"):
        build_data(DataConfig(dataset="digits", scale_jitter=[0.8, 1.25]))
    scenes = ScenesConfig(canvas_size=64, train_size=8, test_size=4)
    data = build_data(DataConfig(dataset="scenes-det", data_dir=str(tmp_path), scale_jitter=[0.8, 1.25],
                                 scenes=scenes))
    assert data.augmentation == "hflip + scale jitter [0.8, 1.25]"
    off = build_data(DataConfig(dataset="scenes-det", data_dir=str(tmp_path), scale_jitter=[0.8, 1.25],
                                augment=False, scenes=scenes))
    assert off.augmentation == "none" and off.train_loader(4, seed=0).scale_jitter is None
    assert data.train_loader(4, seed=0).scale_jitter == (0.8, 1.25)
