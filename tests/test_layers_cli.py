"""``featkd layers`` hides the points that produce no tensor (sizes, asserts, getattr...) unless ``--all``."""

from __future__ import annotations

import pytest

from featkd.cli import main


def table(capsys, *args: str) -> tuple[list[list[str]], str]:
    assert main(["layers", *args]) == 0
    out = capsys.readouterr()
    return [line.split() for line in out.out.splitlines()[1:]], out.err


def test_vit_layers_hide_non_tensor_nodes(capsys, one_thread):
    pytest.importorskip("torchvision")
    args = ("torchvision:vit_b_16", "--input-shape", "1,32,32", "--option", "image_size=32")
    rows, err = table(capsys, *args)
    ops = {row[2] for row in rows if len(row) in (4, 5)}  # 5: (N, C) tokens get a leading+grid column
    assert not ops & {"getattr", "assert", "eq", "dim", "floordiv", "getitem_1"}
    assert all(row[-1] != "-" for row in rows)  # every listed point has a shape
    names = [row[0] for row in rows]
    assert "encoder.layers.encoder_layer_0.self_attention" not in names  # a (tensor, None) tuple
    assert "class_token" not in names and "encoder.pos_embedding" not in names  # parameters, not activations
    assert ["encoder.layers.encoder_layer_11.add_1", "node", "add", "5x768", "1+2x2"] in rows  # class token + 2x2
    assert ["conv_proj", "module", "Conv2d", "768x2x2"] in rows
    hidden = int(err.split()[0].lstrip("("))
    assert "--all lists them" in err
    all_rows, err_all = table(capsys, *args, "--all")
    assert len(all_rows) == len(rows) + hidden and err_all == ""
    all_ops = {row[2] for row in all_rows}
    assert {"getattr", "assert", "eq"} <= all_ops
    assert ["encoder.layers.encoder_layer_0.self_attention", "module", "MultiheadAttention", "-"] in all_rows
    assert ["class_token", "node", "1x768"] in all_rows  # no op: an fx get_attr


def test_cnn_listing_is_unchanged(capsys, one_thread):
    rows, err = table(capsys, "resnet8", "--input-shape", "1,8,8")
    assert err == "" and all(row[-1] != "-" for row in rows)
    assert ["layer3.0.add", "node", "add", "64x2x2"] in rows


def test_a_reader_that_leaves_early_gets_no_traceback():
    """``featkd layers ... | head -1``: the pipe closes before the table is written; exit 141, stderr empty."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    proc = subprocess.run([sys.executable, "-m", "featkd", "layers", "resnet8", "--input-shape", "1,8,8"],
                          stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize(("model", "shape", "error"), [
    ("timm:convnext_atto", (1, 8, 8), "RuntimeError: Calculated padded input size per channel"),  # too small
    ("vit_tiny_p4", (1, 2, 2), "AssertionError: Wrong image height! Expected 28 but got 2!"),  # another size
])
@pytest.mark.parametrize("groups", [False, True])
def test_a_model_failing_on_the_input_is_one_line_exit_2(capsys, one_thread, model, shape, error, groups):
    pytest.importorskip(model.split(":")[0] if ":" in model else "torchvision")
    text = ",".join(map(str, shape))
    args = (["resnet8", "--groups", "--student", model] if groups else [model]) + ["--input-shape", text]
    assert main(["layers", *args]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    role = "student" if groups else "model"
    assert len(lines) == 1 and lines[0].startswith(
        f"featkd: error: {role} {model!r} fails on an input of shape (2, {text.replace(',', ', ')}) ({error}"
    ), out.err
    assert lines[0].endswith("; try another --input-shape (C,H,W of one example)")
    assert out.out == ""  # nothing printed before the error (the teacher's groups neither)
