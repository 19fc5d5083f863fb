"""Faster / Mask R-CNN on featkd trunks (featkd.models.detection): their light heads and options, a train step
on real scenes with masks (and scale jitter), eval outputs and mask AP, capture points, stride pairing, and the
scenes-inst configs. Real models and data, no mocks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from featkd.capture.capture import CapturingModel
from featkd.capture.listing import list_capture_points
from featkd.capture.points import expand_entry_pairs
from featkd.config import load_config
from featkd.data import DataConfig, build_data
from featkd.data.config import ScenesConfig
from featkd.errors import FeatkdError
from featkd.models import DETECTION_MODELS, create_model, model_options
from featkd.tasks.detection import DetectionTask

tv_detection = pytest.importorskip("torchvision.models.detection")
pytest.importorskip("pycocotools")

ROOT = Path(__file__).resolve().parents[1]
SCENES = ScenesConfig(canvas_size=64, train_size=16, test_size=8)
HALF = {"widths": [8, 16, 32]}
INST_CONFIGS = sorted((ROOT / "configs").glob("scenes-inst-*.yaml"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fashion_mnist_dir):
    """16 + 8 real scene canvases (64 px) with instance masks, scale jitter on."""
    return build_data(DataConfig(dataset="scenes-det", data_dir=str(tmp_path_factory.mktemp("scenes-inst")),
                                 masks=True, scale_jitter=[0.8, 1.25], scenes=SCENES, batch_size=4))


def test_light_heads_by_default_and_every_option_overridable(one_thread):
    assert {f"{k}_{b}" for k in ("fasterrcnn", "maskrcnn") for b in ("resnet8", "resnet20")} <= set(DETECTION_MODELS)
    m = create_model("maskrcnn_resnet8", num_classes=11)
    assert type(m) is tv_detection.MaskRCNN
    rpn, heads = m.rpn, m.roi_heads
    assert rpn._pre_nms_top_n == {"training": 600, "testing": 300}
    assert rpn._post_nms_top_n == {"training": 300, "testing": 100}
    assert rpn.fg_bg_sampler.batch_size_per_image == 64 and rpn.anchor_generator.num_anchors_per_location() == [9] * 4
    assert heads.fg_bg_sampler.batch_size_per_image == 32 and heads.box_head.fc6.out_features == 256
    assert heads.box_roi_pool.featmap_names == ["0", "1"] and heads.box_roi_pool.sampling_ratio == 0
    assert heads.box_predictor.cls_score.out_features == 11 and heads.score_thresh == 0.05
    assert [c[0].out_channels for c in heads.mask_head] == [32, 32] and heads.mask_roi_pool.output_size == (14, 14)
    predictor = heads.mask_predictor
    assert predictor.conv5_mask.out_channels == 32 and predictor.mask_fcn_logits.out_channels == 11
    assert type(m.transform).__name__ == "KeepSizeTransform"

    f = create_model("fasterrcnn_resnet8", num_classes=3, representation_size=64, box_batch_size_per_image=16,
                     rpn_post_nms_top_n_test=20, sampling_ratio=2, score_thresh=0.1, nms_thresh=0.4,
                     detections_per_img=7, fpn_channels=32, anchor_sizes=[8, 16, 32, 64], **HALF)
    assert type(f) is tv_detection.FasterRCNN and not f.roi_heads.has_mask()
    assert f.roi_heads.box_head.fc6.in_features == 32 * 7 * 7 and f.roi_heads.box_head.fc7.out_features == 64
    assert f.roi_heads.fg_bg_sampler.batch_size_per_image == 16 and f.rpn._post_nms_top_n["testing"] == 20
    assert (f.roi_heads.score_thresh, f.roi_heads.nms_thresh, f.roi_heads.detections_per_img) == (0.1, 0.4, 7)
    assert f.roi_heads.box_roi_pool.sampling_ratio == 2 and f.rpn.anchor_generator.sizes[0] == (8, 10, 13)
    assert f.backbone.body.layer1[0].conv1.out_channels == 8
    small = create_model("maskrcnn_resnet8", num_classes=3, mask_layers=[16], mask_dim_reduced=8)
    assert [c[0].out_channels for c in small.roi_heads.mask_head] == [16]
    assert small.roi_heads.mask_predictor.conv5_mask.in_channels == 16

    options = list(model_options("maskrcnn_resnet8"))
    assert options[:3] == ["widths", "stem_width", "entry_width"]
    assert options[-2:] == ["mask_layers", "mask_dim_reduced"]
    assert "mask_layers" not in model_options("fasterrcnn_resnet8")
    assert "representation_size" not in model_options("fcos_resnet8")  # one-stage kinds: as before
    for name, bad, message in [
        ("fasterrcnn_resnet8", {"mask_layers": [8]}, "unknown option 'mask_layers'"),
        ("fasterrcnn_resnet8", {"representation_size": 0}, "representation_size must be positive, got 0"),
        ("maskrcnn_resnet8", {"mask_layers": []}, "mask_layers needs at least one value"),
        ("maskrcnn_resnet8", {"sampling_ratio": -1}, "sampling_ratio must be >= 0"),
        ("maskrcnn_resnet8", {"anchor_sizes": [16, 32]}, "anchor_sizes needs 4 values"),
    ]:
        with pytest.raises(FeatkdError, match=message):
            create_model(name, num_classes=3, **bad)


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn"])
def test_train_step_and_eval_on_real_scenes(scenes, kind, one_thread):
    torch.manual_seed(0)
    task = DetectionTask.from_data(scenes)
    model = create_model(f"{kind}_resnet8", num_classes=scenes.num_classes, **HALF)
    task.check_models(None, model, "", f"{kind}_resnet8", "scenes-det")
    capture = CapturingModel(model, ["backbone.body.layer2.0.add", "backbone.fpn[0]"], torch.zeros(2, 3, 64, 64))
    x, ys = next(iter(scenes.train_loader(4, seed=0)))
    for t in ys:  # the jittered real targets: each mask still fills its box
        for box, mask in zip(t["boxes"], t["masks"], strict=True):
            rows, cols = torch.nonzero(mask, as_tuple=True)
            pixel_box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
            assert [float(v) for v in pixel_box] == pytest.approx(box.tolist(), abs=1.01)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _, feats, terms = task.forward_student(capture, x, ys)
    expected = {"classifier", "box_reg", "objectness", "rpn_box_reg"} | ({"mask"} if kind == "maskrcnn" else set())
    assert set(terms) == expected and all(math.isfinite(float(v.detach())) for v in terms.values())
    assert feats["backbone.fpn[0]"].shape == (4, 64, 8, 8)
    assert feats["backbone.body.layer2.0.add"].shape == (4, 16, 8, 8)
    before = model.backbone.body.layer1[0].conv1.weight.detach().clone()
    (sum(terms.values()) + feats["backbone.fpn[0]"].square().mean()).backward()
    assert model.backbone.body.layer1[0].conv1.weight.grad.abs().sum() > 0
    if kind == "maskrcnn":
        assert model.roi_heads.mask_head[0][0].weight.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(before, model.backbone.body.layer1[0].conv1.weight)

    model.eval()
    x_test, y_test = next(iter(scenes.test_loader(8)))
    with torch.no_grad():
        out = model(list(x_test))
    assert len(out) == 8
    for o in out:
        m = len(o["boxes"])
        assert o["boxes"].shape == (m, 4) and o["scores"].shape == (m,) and m <= 100
        assert ((o["labels"] >= 1) & (o["labels"] <= 10)).all()
        if kind == "maskrcnn":
            assert o["masks"].shape == (m, 1, 64, 64) and o["masks"].min() >= 0 and o["masks"].max() <= 1
        else:
            assert "masks" not in o
    task.check_output(out, "student", f"{kind}_resnet8", "scenes-det")
    evaluator = task.evaluator(torch.device("cpu"))
    evaluator.update(out, y_test)
    result = evaluator.result()
    assert "ap" in result and ("mask_ap" in result) == (kind == "maskrcnn")


def test_capture_points_are_listed_and_fpn_levels_pair_by_stride(one_thread):
    model = create_model("maskrcnn_resnet8", num_classes=11, **HALF)
    points = {p.name: p.shape for p in list_capture_points(model, (3, 96, 96))}
    assert points["backbone.body.layer2.0.add"] == (16, 12, 12) and points["backbone.body.layer3"] == (32, 6, 6)
    assert [points[f"backbone.fpn[{k}]"] for k in ("0", "1", "p6", "p7")] == [(64, 12, 12), (64, 6, 6), (64, 3, 3),
                                                                            (64, 2, 2)]
    assert points["roi_heads.mask_head"] == (32, 14, 14) and points["roi_heads.box_head"] == (256,)  # per RoI
    model.eval()  # listing traced the RoI poolers: they still run (no fx Proxy left in their caches)
    with torch.no_grad():
        assert len(model([torch.rand(3, 96, 96)])) == 1
    assert all(isinstance(s, float) for s in model.roi_heads.box_roi_pool.scales)

    example = torch.zeros(2, 3, 96, 96)
    teacher = create_model("maskrcnn_resnet20", num_classes=11)
    by_stride = [[f"backbone.fpn[{k}]"] * 2 for k in ("0", "1", "p6", "p7")]
    for student in ("maskrcnn_resnet8", "fasterrcnn_resnet8", "fcos_resnet8"):  # one FPN for every kind
        s = create_model(student, num_classes=11, **HALF)
        assert expand_entry_pairs([["backbone.fpn[*]", "backbone.fpn[*]"]], teacher, s, example) == by_stride

    task = DetectionTask(11, masks=True)  # the teacher runs only transform + backbone for backbone points
    teacher.eval()
    calls = []
    teacher.roi_heads.register_forward_hook(lambda *_: calls.append(1))
    capture = CapturingModel(teacher, ["backbone.fpn[0]", "backbone.body.layer2.2.add"], example)
    calls.clear()
    with torch.no_grad():
        _, feats = task.forward_teacher(capture, torch.rand(2, 3, 96, 96))
    assert not calls and feats["backbone.body.layer2.2.add"].shape == (2, 32, 12, 12)


@pytest.mark.parametrize("path", INST_CONFIGS, ids=[p.stem for p in INST_CONFIGS])
def test_scenes_inst_configs_build(path, tmp_path, fashion_mnist_dir, one_thread):
    """Each config's run assembles (data with masks, both models, the method's capture points) on a small
    scenes set; the teacher's zoo recipe is not built here, so the teacher keeps its initial weights."""
    from featkd.engine.build import build_run

    overrides = [f"data.data_dir={tmp_path}", "data.scenes.train_size=16", "data.scenes.test_size=8",
                 "data.train_subset=null"]
    cfg = load_config(path, overrides + (["teacher.checkpoint=null"] if load_config(path).teacher else []))
    assert cfg.data.masks and cfg.data.scenes.canvas_size == 96
    run = build_run(cfg, log=lambda _m: None)
    assert type(run.student).__name__ == "MaskRCNN" and run.data.masks
    assert run.student.backbone.body.layer1[0].conv1.out_channels == (16 if "resnet20" in cfg.student.model else 8)
    if run.teacher is not None:
        assert type(run.teacher).__name__ == "MaskRCNN" and run.teacher_capture.points
        assert all(p.startswith("backbone") for p in run.teacher_capture.points)


@pytest.mark.slow
def test_one_epoch_of_the_cwt_config_logs_box_and_mask_ap(tmp_path, fashion_mnist_dir, one_thread):
    from featkd.engine.trainer import Trainer

    path = ROOT / "configs" / "scenes-inst-cwt-maskrcnn_resnet20-maskrcnn_resnet8.yaml"
    cfg = load_config(path, [f"data.data_dir={tmp_path}", "data.scenes.train_size=16", "data.scenes.test_size=8",
                             "data.train_subset=null", "data.batch_size=8", "data.eval_batch_size=8",
                             "data.scale_jitter=[0.8,1.25]", "teacher.checkpoint=null", "train.epochs=1",
                             "optim.warmup_epochs=0.5", "train.tensorboard=false"])
    record = Trainer(cfg, out_dir=tmp_path / "run", log=lambda _m: None).fit().history[-1]
    assert {"train_cwt", "train_mask", "train_classifier", "test_ap", "test_mask_ap"} <= set(record)
    assert math.isfinite(record["train_loss"]) and 0 <= record["test_mask_ap"] <= 100
