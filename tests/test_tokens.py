"""Token and channels-last capture points (featkd.capture.layouts): the adapter's shapes and errors, the ViT's points
through CapturingModel, and MGD / CWT / FitNets / AT training ViT -> CNN, CNN -> ViT and ViT -> ViT on real
Fashion-MNIST images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from featkd import Distillation
from featkd.capture.capture import CapturingModel
from featkd.capture.layouts import Layout, split_point, to_map, token_grid
from featkd.capture.trace import preceding_batchnorm
from featkd.cli import main
from featkd.data import DataConfig, build_data
from featkd.errors import FeatkdError
from featkd.models import create_model

pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
BLOCK = "encoder.layers.encoder_layer_1"  # a ViT block: (B, 1 + 7*7, C) tokens at 28 px


def patch_tokens(grid: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, prefix + h*w, C) the way a ViT builds them: flattened row-major, leading tokens first."""
    lead = torch.randn(grid.shape[0], prefix, grid.shape[1])
    return torch.cat([lead, grid.flatten(2).transpose(1, 2)], dim=1)


# ---- the adapter ---------------------------------------------------------------------------------------------

def test_split_point_reads_layout_suffixes():
    assert split_point("blocks.3:tokens") == ("blocks.3", Layout("tokens"))
    assert split_point("blocks.3:tokens=1") == ("blocks.3", Layout("tokens", 1))
    assert split_point("stages.2:nhwc") == ("stages.2", Layout("nhwc"))
    assert split_point("norm:input:tokens=0") == ("norm:input", Layout("tokens", 0))
    assert split_point("backbone[out]:nhwc") == ("backbone[out]", Layout("nhwc"))
    for plain in ("layer3", "fc:input", "layer1.0.add", "backbone.fpn[0]"):
        assert split_point(plain) == (plain, None)
    for bad in ("blocks.3:tokens=x", "blocks.3:tokens:input", "blocks.3:nhwc=1"):
        with pytest.raises(FeatkdError, match=rf"capture point '{bad}': a layout suffix ends the point"):
            split_point(bad)


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize("explicit", [False, True])
def test_tokens_drop_leading_tokens_and_reshape_the_patch_grid(prefix, explicit):
    grid = torch.randn(3, 5, 7, 7)
    layout = Layout("tokens", prefix if explicit else None)
    out = to_map(patch_tokens(grid, prefix), layout, "blk:tokens", (28, 28))
    assert out.is_contiguous() and torch.equal(out, grid)


def test_tokens_grid_has_the_input_aspect_and_auto_stays_conservative():
    wide = torch.randn(2, 4, 7, 14)  # a 28 x 56 input in 4 x 4 patches
    assert torch.equal(to_map(patch_tokens(wide, 1), Layout("tokens"), "blk:tokens", (28, 56)), wide)
    assert token_grid(50, (28, 28), None) == (1, 7, 7)
    assert token_grid(197, (224, 224), None) == (1, 14, 14)  # ViT-B/16
    assert token_grid(198, (224, 224), None) == (2, 14, 14)  # DeiT: class + distillation token
    assert token_grid(49, None, None) == (0, 7, 7)  # Swin's flattened 7 x 7 window grid
    assert token_grid(2, (28, 28), None) is None  # 1 + 1x1 or 2 + nothing: auto wants a 2 x 2 grid at least
    assert token_grid(2, (28, 28), 1) == (1, 1, 1)  # explicit: any grid
    assert token_grid(53, (28, 28), 4) == (4, 7, 7)  # class + 3 register tokens, given
    assert token_grid(50, (28, 56), None) == (0, 5, 10)  # the same 50 tokens are a 1:2 grid on a 1:2 input
    assert token_grid(40, (28, 56), None) is None  # 40, 39 and 38 are no 1:2 grid


def test_nhwc_maps_are_permuted():
    nhwc = torch.randn(2, 7, 5, 3)
    out = to_map(nhwc, Layout("nhwc"), "stage:nhwc", (28, 20))
    assert out.shape == (2, 3, 7, 5) and out.is_contiguous() and torch.equal(out, nhwc.permute(0, 3, 1, 2))


@pytest.mark.parametrize(("shape", "point", "input_hw", "match"), [
    ((2, 52, 8), "blk:tokens", (28, 28),
     r"^capture point 'blk:tokens': 52 tokens \(shape \(2, 52, 8\)\) are not 0, 1 or 2 leading tokens \+ an h x w "
     r"patch grid \(h, w >= 2\) of the input's 28:28 aspect; give the number of leading tokens: "
     r"'blk:tokens=3' \(3 \+ 7x7\) or 'blk:tokens=16' \(16 \+ 6x6\) fits$"),
    ((2, 50, 8), "blk:tokens=2", (28, 28), r"^capture point 'blk:tokens=2': 50 tokens .* less 2 leading tokens do "
                                           r"not form an h x w patch grid of the input's 28:28 aspect; "
                                           r"'blk:tokens=1' \(1 \+ 7x7\) or 'blk:tokens=14' \(14 \+ 6x6\) fits$"),
    ((2, 8, 7, 7), "layer3:tokens", (28, 28), r"':tokens' expects \(B, N, C\) tokens, got shape \(2, 8, 7, 7\)"),
    ((2, 50, 8), "blk:nhwc", (28, 28), r"':nhwc' expects a \(B, H, W, C\) map, got shape \(2, 50, 8\)"),
])
def test_shapes_that_cannot_be_adapted_are_one_line_errors(shape, point, input_hw, match):
    with pytest.raises(FeatkdError, match=match) as info:
        _, layout = split_point(point)
        to_map(torch.zeros(shape), layout, point, input_hw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("n", "point", "input_hw"), [
    (52, "blk:tokens", (28, 28)),  # 1 + 51 is no square grid: 3 + 7x7 is
    (53, "blk:tokens", (28, 28)),  # class + 4 register tokens
    (50, "blk:tokens=2", (28, 28)),
    (41, "blk:tokens", (28, 56)),  # 1:2 grids: 0 + 5x10 needs 50, 1 + 4x8 = 33 -> 9 leading tokens
    (40, "blk:tokens=0", (20, 30)),  # 2:3 grids: 6, 24, 54 cells
    (2, "blk:tokens", (28, 28)),  # only 1 + 1x1
])
def test_wrong_token_count_hint_proposes_only_prefixes_that_fit(n, point, input_hw):
    _, layout = split_point(point)
    with pytest.raises(FeatkdError) as info:
        to_map(torch.zeros(2, n, 8), layout, point, input_hw)
    proposed = [int(p) for p in re.findall(r"'blk:tokens=(\d+)'", str(info.value).split(";", 1)[1])]
    assert proposed and str(info.value).endswith(" fits"), str(info.value)
    for prefix in proposed:  # every proposal reads as leading tokens + a grid of the input's aspect
        out = to_map(torch.zeros(2, n, 8), Layout("tokens", prefix), f"blk:tokens={prefix}", input_hw)
        h, w = out.shape[2:]
        assert h * input_hw[1] == w * input_hw[0] and prefix + h * w == n


def test_wrong_token_count_hint_says_when_no_prefix_fits():
    with pytest.raises(FeatkdError, match=r"; no number of leading tokens leaves such a grid of 5 tokens$"):
        to_map(torch.zeros(2, 5, 8), Layout("tokens", 1), "blk:tokens=1", (20, 30))  # 2:3 grids start at 6


# ---- through CapturingModel on torchvision's ViT ----------------------------------------------------------------

@pytest.fixture
def vit(one_thread):
    torch.manual_seed(0)
    return create_model("vit_tiny_p4", num_classes=10, in_channels=1, num_layers=2, hidden_dim=32)


def test_vit_points_become_maps_in_the_patch_embedding_order(vit):
    x = torch.randn(4, 1, 28, 28)
    points = ["conv_proj", "encoder:input:tokens", f"{BLOCK}:tokens", f"{BLOCK}:tokens=1", BLOCK]
    capture = CapturingModel(vit, points, x[:2])  # module points: hooks
    assert capture.shapes == {"conv_proj": (32, 7, 7), "encoder:input:tokens": (32, 7, 7),
                              f"{BLOCK}:tokens": (32, 7, 7), f"{BLOCK}:tokens=1": (32, 7, 7), BLOCK: (50, 32)}
    vit.eval()
    out, feats = capture(x)
    assert out.shape == (4, 10)
    # the encoder's input is [class token, patch embedding tokens]: its grid is conv_proj's output itself
    assert torch.equal(feats["encoder:input:tokens"], feats["conv_proj"])
    assert torch.equal(feats[f"{BLOCK}:tokens"], feats[BLOCK][:, 1:].transpose(1, 2).reshape(4, 32, 7, 7))
    assert torch.equal(feats[f"{BLOCK}:tokens"], feats[f"{BLOCK}:tokens=1"])
    fx_capture = CapturingModel(vit, [f"{BLOCK}.add_1:tokens"], x[:2])  # an fx node: the block's residual sum
    assert fx_capture.traced_whole
    torch.testing.assert_close(fx_capture(x)[1][f"{BLOCK}.add_1:tokens"], feats[f"{BLOCK}:tokens"])
    assert preceding_batchnorm(vit, f"{BLOCK}:tokens") is None  # LayerNorms only: MGD measures its margins


def test_timm_deit_drops_the_class_and_the_distillation_token(one_thread):
    pytest.importorskip("timm")
    deit = create_model("timm:deit_tiny_distilled_patch16_224", num_classes=10, in_channels=1, img_size=28,
                        patch_size=4, depth=2).eval()
    x = torch.randn(2, 1, 28, 28)
    capture = CapturingModel(deit, ["blocks.1:tokens", "blocks.1"], x)
    assert capture.shapes == {"blocks.1:tokens": (192, 7, 7), "blocks.1": (51, 192)}  # 2 + 7x7 tokens
    _, feats = capture(x)
    assert torch.equal(feats["blocks.1:tokens"], feats["blocks.1"][:, 2:].transpose(1, 2).reshape(2, 192, 7, 7))


def test_cnn_maps_are_untouched_and_bad_token_points_fail_at_probe(vit):
    cnn = create_model("resnet8", num_classes=10, in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    capture = CapturingModel(cnn, ["layer3", "layer3:nhwc"], x)
    cnn.eval()
    _, feats = capture(x)
    assert capture.shapes == {"layer3": (64, 7, 7), "layer3:nhwc": (7, 64, 7)}  # nhwc: only if asked for
    assert torch.equal(feats["layer3:nhwc"], feats["layer3"].permute(0, 3, 1, 2))
    with pytest.raises(FeatkdError, match=rf"capture point '{BLOCK}:tokens=3': 50 tokens"):
        CapturingModel(vit, [f"{BLOCK}:tokens=3"], x)
    with pytest.raises(FeatkdError, match=r"capture point 'layer3:tokens': ':tokens' expects \(B, N, C\) tokens"):
        CapturingModel(cnn, ["layer3:tokens"], x)
    with pytest.raises(FeatkdError, match=r"has no capture point 'encoder.layers.encoder_layer_9'"):
        CapturingModel(vit, ["encoder.layers.encoder_layer_9:tokens"], x)
    with pytest.raises(FeatkdError, match=rf"for \(N, C\) tokens capture '{BLOCK}:tokens'"):
        Distillation(cnn, vit, "fitnets", {"pairs": [[BLOCK, "layer3"]]}, example_input=x)


def test_layers_lists_the_token_reading(capsys, one_thread):
    args = ["layers", "vit_tiny_p4", "--input-shape", "1,28,28", "--filter", r"encoder_layer_3$|conv_proj"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("  tokens (leading+grid, as NAME:tokens)")
    rows = [line.split() for line in lines[1:]]
    assert ["conv_proj", "module", "Conv2d", "64x7x7"] in rows
    assert ["encoder.layers.encoder_layer_3", "module", "EncoderBlock", "50x64", "1+7x7"] in rows


# ---- the feature methods on tokens ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_batch(fashion_mnist_dir):
    """16 real Fashion-MNIST training images (normalised, no augmentation) and their labels."""
    bundle = build_data(DataConfig(dataset="fashion-mnist", data_dir=str(fashion_mnist_dir), train_subset=64,
                                   augment=False))
    return next(iter(bundle.train_loader(16, seed=0)))


def small_vit(width: int) -> torch.nn.Module:
    return create_model("vit_tiny_p4", num_classes=10, in_channels=1, num_layers=2, hidden_dim=width)


# point and first layer of each kind of network; the ViT teacher (48) and student (32) differ in width, the
# CNN's layer3 is 64 wide: every method gets narrower, wider and equal pairs across the three directions
NETS = {
    "vit-teacher": (lambda: small_vit(48), f"{BLOCK}:tokens", "conv_proj"),
    "vit-student": (lambda: small_vit(32), f"{BLOCK}:tokens", "conv_proj"),
    "cnn": (lambda: create_model("resnet8", num_classes=10, in_channels=1), "layer3.0.add", "conv1"),
}
DIRECTIONS = {"vit->cnn": ("vit-teacher", "cnn"), "cnn->vit": ("cnn", "vit-student"),
              "vit->vit": ("vit-teacher", "vit-student")}
METHOD_OPTIONS = {"mgd": {"reducer": "amp"}, "cwt": {}, "fitnets": {}, "at": {}}


@pytest.mark.parametrize("direction", list(DIRECTIONS))
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_feature_methods_train_on_tokens(method, direction, fashion_batch, one_thread):
    x, y = fashion_batch
    torch.manual_seed(0)
    (make_t, t_point, _), (make_s, s_point, s_first) = (NETS[k] for k in DIRECTIONS[direction])
    teacher, student = make_t(), make_s()
    kd = Distillation(teacher, student, method, {"pairs": [[s_point, t_point]], **METHOD_OPTIONS[method]},
                      example_input=x[:2], train_loader=[(x, y)], log=lambda _m: None)
    assert kd.student_capture.shapes[s_point][1:] == (7, 7) and kd.teacher_capture.shapes[t_point][1:] == (7, 7)
    student.train()
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05, momentum=0.9)
    first = student.get_submodule(s_first).weight
    before = first.detach().clone()
    for step in range(2):
        losses = kd(x, y)
        assert set(losses) == {"ce", method} and all(torch.isfinite(v) for v in losses.values()), losses
        if step == 0:  # the method's term alone reaches the student's first layer (a ViT's head starts at 0)
            optimizer.zero_grad()
            losses[method].backward(retain_graph=True)
            assert first.grad is not None and torch.isfinite(first.grad).all() and first.grad.abs().sum() > 0
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        kd.on_step_end()
    assert not torch.equal(before, first.detach())


@pytest.mark.parametrize("name", ["mgd-amp", "cwt"])
def test_vit_configs_build_with_the_zoo_teacher(name, fashion_mnist_dir, one_thread):
    """The shipped ViT configs: the real teacher, token points as 64x7x7 maps, MGD's margins from the teacher's BNs."""
    from featkd.config import load_config
    from featkd.engine.build import build_run
    from featkd.methods.base import Batch

    overrides = [f"data.data_dir={fashion_mnist_dir}"] + (["method.stats_images=64"] if name == "mgd-amp" else [])
    cfg = load_config(ROOT / "configs" / f"fashion-mnist-{name}-resnet20-vit_tiny_p4.yaml", overrides)
    run = build_run(cfg, log=lambda _m: None)
    assert set(run.student_capture.shapes.values()) == {(64, 7, 7)}
    if name == "mgd-amp":
        assert [st.margin_source for st in run.distiller.stages] == ["layer2.2.bn2", "layer3.2.bn2"]
        run.distiller.setup(run.context(steps_per_epoch=1))  # the first matching, on 64 training images
    x, y = next(iter(run.data.train_loader(8, seed=0)))
    (t_out, t_feats), (s_out, s_feats) = run.teacher_capture(x), run.student_capture(x)
    losses = run.distiller(Batch(inputs=x, targets=y, student_logits=s_out, student_features=s_feats,
                                 teacher_logits=t_out, teacher_features=t_feats))
    assert set(losses) == {"ce", cfg.method_name} and all(torch.isfinite(v) for v in losses.values())
