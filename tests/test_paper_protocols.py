"""The papers' own settings (benchmarks/protocols/paper-*.yaml): each is complete, and each runs on its shapes.

The smoke test (issue 25) trains every row of every paper protocol for two steps and evaluates it once, on a
handful of images generated in the protocol's data layout, with the protocol's real teacher and student (random
weights: nothing is downloaded) on the CPU. Where the real input is too slow for a CPU the protocol's ``smoke:``
items shrink it, and the protocol says so.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from featkd.bench.protocol import load_protocol, protocols_dir

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(p.stem for p in protocols_dir().glob("paper-*.yaml"))


def write_imagenet(root: Path) -> None:
    """ImageNet's ImageFolder layout: train/ and val/ with WordNet-id class folders of JPEGs of ImageNet-like
    sizes (the crops make them 224x224)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for k, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(240, 330)), int(rng.integers(260, 400))
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., k] += 150
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)


def write_layout(dataset: str, root: Path) -> Path:
    root.mkdir(parents=True)
    if dataset == "cifar100":
        from tests.test_data import write_cifar

        write_cifar(root, 100, per_file=8)
    elif dataset == "imagefolder":
        write_imagenet(root)
    elif dataset == "cub200":
        from tests.helpers import write_cub

        write_cub(root, train_per_class=2, test_per_class=1)
    elif dataset == "cinic10":
        from tests.helpers import write_cinic

        write_cinic(root)
    elif dataset == "coco":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from data_throughput import write_coco

        write_coco(root, {"train2017": 4, "val2017": 2})
    elif dataset == "cityscapes":
        from tests.test_seg_stream import write_cityscapes

        write_cityscapes(root, h=256, w=512, train=4, val=1)
    else:
        raise AssertionError(f"no layout writer for {dataset}")
    return root


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(dataset: str) -> Path:
        if dataset not in made:
            made[dataset] = write_layout(dataset, tmp_path_factory.mktemp("layouts") / dataset)
        return made[dataset]

    return get


def test_every_paper_protocol_is_complete():
    """Published numbers with their source, a source per hyper-parameter group, the training set's size."""
    assert len(PAPER) >= 14
    for name in PAPER:
        p = load_protocol(name)
        assert p.paper and p.published is not None and p.published.source and p.sources, name
        assert p.train_images and p.train_images > 0, name
        assert set(p.published.rows) <= set(p.methods) and p.reference in p.methods, name


@pytest.mark.parametrize("name", PAPER)
def test_every_paper_protocol_trains_two_steps_and_evaluates_on_its_shapes(name, layouts, tmp_path):
    from featkd.bench.paper import row_config, smoke, training_input

    protocol = load_protocol(name)
    first = row_config(protocol, protocol.reference, tmp_path)
    rows = smoke(protocol, list(protocol.methods), layouts(first.data.dataset), log=lambda _m: None)
    assert [r["method"] for r in rows] == list(protocol.methods)
    assert all(math.isfinite(r["value"]) for r in rows)
    if not protocol.smoke:  # the protocol's own input size, unchanged
        assert all(r["input"] == list(training_input(first)) for r in rows)


def test_estimate_prints_runs_epochs_images_and_gpu_hours(capsys):
    from featkd.cli import main

    assert main(["bench", "paper-cifar100-resnet56-resnet20", "--estimate", "--methods", "none", "kd",
                 "--gpu-tflops", "100"]) == 0
    out = capsys.readouterr().out
    assert "none" in out and "kd" in out and "50,000" in out and "240" in out
    assert "GPU hours at 100 effective TFLOP/s (--gpu-tflops)" in out
    from featkd.bench.paper import estimate

    est = estimate(load_protocol("paper-cifar100-resnet56-resnet20"), ["none", "kd"], 3, gpu_tflops=100)
    none, kd = est["rows"]["none"], est["rows"]["kd"]
    # resnet20: ~41 MFLOPs per 32x32 image (x 2: multiply-adds counted as two), resnet56: ~2.9x that
    assert 0.07 < none["student_gflops"] < 0.09 and none["teacher_gflops"] == 0
    assert kd["teacher_gflops"] == pytest.approx(none["student_gflops"] * 126 / 41, rel=0.1)
    images = 240 * 50_000 * 3
    assert kd["gpu_hours"] == pytest.approx(images * (3 * none["student_gflops"] + kd["teacher_gflops"]) * 1e9
                                            / 100e12 / 3600)


def test_docs_reproduce_is_generated_from_the_protocols():
    """docs/reproduce.md: one row per protocol row, the published numbers from the protocols, featkd's empty
    until a results file exists; regenerated by benchmarks/reproduce_table.py (no number typed by hand)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import reproduce_table

    assert reproduce_table.main(["--check"]) == 0, "run: python benchmarks/reproduce_table.py"
    text = (ROOT / "docs" / "reproduce.md").read_text()
    assert "MGD here is Matching Guided Distillation" in text and "Masked Generative Distillation" in text
    for name in PAPER:
        assert f"### {name}" in text and f"`featkd bench {name}`" in text
    assert "| mgd-amp | 28.53 |  | smoke-tested; not run at full scale |" in text  # ImageNet MGD-AMP


def test_protocol_rows_inline_and_published_are_checked(tmp_path):
    from featkd.errors import FeatkdError

    head = "name: t\nmethods:\n  none: {method: {name: none}}\n"
    (tmp_path / "a.yaml").write_text(head)
    with pytest.raises(FeatkdError, match=r"methods\.none: an inline row needs a base: config"):
        load_protocol(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("base: configs/base/cifar100.yaml\n" + head
                                     + "published: {metric: acc, source: s, rows: {kd: 1.0}}\n")
    with pytest.raises(FeatkdError, match=r"published\.rows: .kd. is not one of its methods"):
        load_protocol(str(tmp_path / "b.yaml"))
    (tmp_path / "c.yaml").write_text("base: configs/base/cifar100.yaml\nname: t\nmethods:\n  none: {student: {}}\n")
    with pytest.raises(FeatkdError, match="an inline row needs a method: mapping"):
        load_protocol(str(tmp_path / "c.yaml"))
