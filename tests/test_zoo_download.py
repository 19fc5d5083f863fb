"""Published checkpoints in the zoo (entries with a ``url``): downloaded once, checked, converted, loaded strictly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from featkd.errors import FeatkdError


def published_resnet56(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint laid out as RepDistiller saves one: {"model": state_dict} of a DataParallel model whose
    projection shortcuts are called ``downsample``; returns featkd's own state_dict of the same weights."""
    from featkd.models import create_model

    torch.manual_seed(0)
    state = create_model("resnet56", num_classes=100).state_dict()
    theirs = {"module." + re.sub(r"\.shortcut\.", ".downsample.", k): v for k, v in state.items()}
    torch.save({"model": theirs, "epoch": 240}, path)
    return state


def write_zoo(folder: Path, entry: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps([entry]))


def test_a_published_checkpoint_is_downloaded_once_converted_and_loaded(tmp_path, monkeypatch):
    from featkd.engine.checkpoint import load_model_weights
    from featkd.models import create_model
    from featkd.models.zoo import load_manifest, resolve_weights, sha256_of, verify_entry

    source = tmp_path / "server" / "ckpt_epoch_240.pth"
    source.parent.mkdir()
    state = published_resnet56(source)
    entry = {"name": "c100-r56", "url": source.as_uri(), "state_key": "model",
             "rename": [[r"\.downsample\.", ".shortcut."]], "dataset": "cifar100", "model": "resnet56",
             "options": {}, "test_acc": 72.34}
    monkeypatch.setenv("FEATKD_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("FEATKD_CACHE", str(tmp_path / "cache"))
    write_zoo(tmp_path / "zoo", entry)
    assert "not downloaded yet" in verify_entry(load_manifest()["c100-r56"])
    path = resolve_weights("zoo:c100-r56")
    model = create_model("resnet56", num_classes=100)
    load_model_weights(model, path, "teacher.checkpoint")  # strict: every key converted
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    record = json.loads((tmp_path / "cache" / "zoo" / "c100-r56.json").read_text())
    assert record["trusted_on_first_use"] and record["sha256_download"] == sha256_of(source)
    assert verify_entry(load_manifest()["c100-r56"]) is None  # fetched: the entry is complete now
    # once: a second resolution reads the converted file, even with the source gone
    source.unlink()
    assert resolve_weights("zoo:c100-r56") == path
    # a download that differs from the recorded one is refused (trust on first use)
    (tmp_path / "cache" / "zoo" / "c100-r56.pt").unlink()
    (tmp_path / "cache" / "zoo" / "c100-r56.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    downloaded = next((tmp_path / "cache" / "zoo" / "downloads").iterdir())
    torch.save({"model": {}}, downloaded)
    with pytest.raises(FeatkdError, match=r"c100-r56.*expected .*a corrupt or different file"):
        resolve_weights("zoo:c100-r56")


def test_a_download_that_cannot_happen_says_where_to_put_the_file(tmp_path, monkeypatch):
    from featkd.models.zoo import resolve_weights

    entry = {"name": "gone", "url": (tmp_path / "nowhere" / "w.pth").as_uri(), "sha256_prefix": "0676ba61",
             "dataset": "imagenet", "model": "torchvision:resnet50", "options": {}, "test_acc": 76.13}
    monkeypatch.setenv("FEATKD_ZOO", str(tmp_path / "zoo"))
    monkeypatch.setenv("FEATKD_CACHE", str(tmp_path / "cache"))
    write_zoo(tmp_path / "zoo", entry)
    with pytest.raises(FeatkdError) as exc:
        resolve_weights("zoo:gone")
    text = str(exc.value)
    assert "\n" not in text and "cannot download" in text and str(tmp_path / "cache" / "zoo" / "downloads") in text


def test_the_shipped_published_teachers_are_listed_with_their_sources():
    from featkd.models.zoo import is_download, load_manifest

    entries = {n: e for n, e in load_manifest().items() if is_download(e)}
    assert {"cifar100-resnet56", "cifar100-resnet110", "cifar100-resnet32x4", "cifar100-vgg13",
            "cifar100-wrn_40_2", "imagenet-torchvision-resnet50", "imagenet-torchvision-resnet101"} <= set(entries)
    for e in entries.values():
        assert e["source"] and (e.get("sha256_prefix") or e.get("state_key")), e["name"]
