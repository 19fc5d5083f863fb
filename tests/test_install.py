"""featkd as a pip user gets it: the wheel carries the configs, protocols and zoo; configs/env/--version commands.

The slow test builds the wheel from a copy of the source tree (offline: ``pip wheel --no-build-isolation``),
installs it without dependencies into a temporary folder, and runs the product from another temporary folder
with only that folder on PYTHONPATH, so nothing is read from the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import featkd
from featkd import resources
from featkd.bench.protocol import load_protocol
from featkd.cli import main
from featkd.config import load_raw

ROOT = Path(__file__).resolve().parents[1]
#: the repository folders the package ships, by their name inside featkd/_data
SHIPPED = {"configs": ROOT / "configs", "protocols": ROOT / "benchmarks" / "protocols", "zoo": ROOT / "zoo"}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def shipped_files() -> set[str]:
    """What the wheel must hold under featkd/_data: every file of the three repository folders."""
    return {f"featkd/_data/{kind}/{p.relative_to(folder).as_posix()}"
            for kind, folder in SHIPPED.items() for p in folder.rglob("*") if p.is_file()}


def test_shipped_files_have_one_copy():
    for kind, folder in SHIPPED.items():
        link = ROOT / "featkd" / "_data" / kind
        assert link.is_symlink() and link.resolve() == folder.resolve(), link  # the repository's folder itself
        assert resources.shipped(kind) == folder.resolve()
    assert (resources.configs_dir() / "base" / "digits.yaml").is_file()
    assert (resources.zoo_dir() / "manifest.json").is_file()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"featkd {featkd.__version__}"
    assert featkd.__version__ in (ROOT / "featkd" / "__init__.py").read_text()
    assert 'dynamic = ["version"]' in (ROOT / "pyproject.toml").read_text()  # one place holds the version


def test_configs_list_show_copy(capsys, tmp_path):
    code, out, _ = cli(capsys, "configs", "list", "^digits-(kd|none)-")
    rows = [line.split() for line in out.splitlines()[1:] if line and not line.startswith(("featkd", " "))]
    assert code == 0 and ["digits-kd-resnet20-resnet8", "digits", "kd", "resnet20", "resnet8"] in rows
    assert ["digits-none-resnet20", "digits", "none", "-", "resnet20"] in rows
    code, out, _ = cli(capsys, "configs", "show", "configs/digits-kd-resnet20-resnet8.yaml")  # a README path works
    assert code == 0 and "base: base/digits.yaml" in out and "name: kd" in out
    code, out, _ = cli(capsys, "configs", "show", "digits-kd-resnet20-resnet8", "--resolved")
    assert code == 0 and "zoo:digits-resnet20" in out and "kd_temperature: 4.0" in out
    code, _, err = cli(capsys, "configs", "show", "digits-kd-resnet20-resnet9")
    assert code == 2 and err.count("\n") == 1 and "did you mean 'digits-kd-resnet20-resnet8'" in err

    dest = tmp_path / "mine"
    code, out, _ = cli(capsys, "configs", "copy", "digits-kd-resnet20-resnet8", str(dest))
    assert code == 0 and f"featkd train {dest / 'digits-kd-resnet20-resnet8.yaml'}" in out
    assert (dest / "base" / "digits.yaml").read_text() == (ROOT / "configs" / "base" / "digits.yaml").read_text()
    copied = load_raw(dest / "digits-kd-resnet20-resnet8.yaml")  # the copy trains exactly as the original
    assert copied == load_raw(ROOT / "configs" / "digits-kd-resnet20-resnet8.yaml")
    code, out, _ = cli(capsys, "configs", "copy", "digits-none-resnet8", str(dest))  # the same base is kept
    assert code == 0 and out.startswith(f"wrote {dest / 'digits-none-resnet8.yaml'}\n")
    code, _, err = cli(capsys, "configs", "copy", "digits-kd-resnet20-resnet8", str(dest))
    assert code == 2 and err.count("\n") == 1 and "exists; not overwritten" in err
    (dest / "base" / "digits.yaml").write_text("data: {dataset: digits}\n")  # a user's edit is never replaced
    code, _, err = cli(capsys, "configs", "copy", "digits-sp-resnet20-resnet8", str(dest))
    assert code == 2 and "differs from the shipped base/digits.yaml" in err
    assert not (dest / "digits-sp-resnet20-resnet8.yaml").exists()  # checked before anything is written


def test_env_reports_one_line_per_item(capsys):
    code, out, _ = cli(capsys, "env")
    items = {line.split()[0] if not line.startswith(("data ", "zoo ", "gpu ")) else " ".join(line.split()[:2])
             for line in out.splitlines()}
    assert code == 0, out
    assert {"featkd", "python", "torch", "torchvision", "cuda", "timm", "pycocotools", "onnxruntime",
            "tensorboard", "tqdm", "matplotlib", "data digits", "data fashion-mnist", "configs", "protocols"} <= items
    for name in json.loads((ROOT / "zoo" / "manifest.json").read_text()):
        assert f"zoo {name['name']}" in items
    assert all("sha256 ok" in line or "recipe, not built" in line or "downloaded on first use" in line
               for line in out.splitlines() if line.startswith("zoo "))


def test_zoo_list_flags_a_changed_file(capsys, tmp_path, monkeypatch):
    (tmp_path / "x.pt").write_bytes(b"not the recorded weights")
    (tmp_path / "manifest.json").write_text(json.dumps([{
        "name": "x", "file": "x.pt", "sha256": "0" * 64, "dataset": "digits", "model": "resnet8", "test_acc": 50.0}]))
    monkeypatch.setenv("FEATKD_ZOO", str(tmp_path))
    code, out, err = cli(capsys, "zoo", "list")
    assert code == 1 and any(line.split()[0] == "x" and " BAD " in line for line in out.splitlines())
    assert "zoo entry 'x':" in err and "corrupt or was replaced" in err
    assert all(" ok " in line or " recipe " in line or " download " in line
               for line in out.splitlines()[1:] if line.split()[0] != "x")


def test_protocol_configs_resolve_in_the_shipped_data(tmp_path, monkeypatch):
    protocol = load_protocol("digits-smoke")
    assert protocol.methods["kd"] == str((ROOT / "configs" / "digits-kd-resnet20-resnet8.yaml").resolve())
    (tmp_path / "mine.yaml").write_text("method: {name: none}\n")
    (tmp_path / "p.yaml").write_text(
        "name: p\nmethods: {none: mine.yaml, kd: configs/digits-kd-resnet20-resnet8.yaml}\n")
    monkeypatch.chdir(tmp_path)  # a protocol file's paths: the current folder first, then the shipped data
    protocol = load_protocol(str(tmp_path / "p.yaml"))
    assert protocol.methods == {"none": str(tmp_path / "mine.yaml"),
                                "kd": str(resources.configs_dir() / "digits-kd-resnet20-resnet8.yaml")}


def _copy_source(dest: Path) -> None:
    """The files a wheel is built from (the package with its links, and the folders they point to)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "featkd", dest / "featkd", symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for folder in SHIPPED.values():
        shutil.copytree(folder, dest / folder.relative_to(ROOT), ignore=ignore)


@pytest.mark.slow
def test_wheel_installed_elsewhere_runs_the_product(tmp_path):
    src, dist, site, work = (tmp_path / n for n in ("src", "dist", "site", "work"))
    _copy_source(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "."],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"pip wheel failed (setuptools>=77 must be in the venv):\n{built.stderr[-3000:]}"
    (wheel,) = dist.glob("featkd-*.whl")
    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
    names = {i.filename for i in infos}
    assert shipped_files() <= names, sorted(shipped_files() - names)
    assert not [i.filename for i in infos if stat.S_ISLNK(i.external_attr >> 16)]  # files, not links
    assert wheel.stat().st_size < 10 * 2**20
    print(f"{wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB, {len(names)} files "
          f"({len(shipped_files())} shipped data files)")

    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATKD_")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(site / "bin" / "featkd"), *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        if check:
            assert proc.returncode == 0, f"featkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        return proc

    where = subprocess.run([sys.executable, "-c", "import featkd; print(featkd.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the repository is not what runs

    assert run("--version").stdout.strip() == f"featkd {featkd.__version__}"

    manifest = json.loads((ROOT / "zoo" / "manifest.json").read_text())
    listed = {line.split()[0]: line.split() for line in run("zoo", "list").stdout.splitlines()[1:]}
    for entry in manifest:
        row = listed[entry["name"]]
        if "file" not in entry:  # a recipe: unbuilt, or built on this machine into the user's cache (not site);
            # or published weights, fetched on first use
            assert row[5] in ("ok", "recipe", "download"), row
            continue
        path = Path(row[-1])
        assert row[-2] == "ok" and path.is_relative_to(site), row
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]

    report = run("env").stdout
    assert f"featkd {featkd.__version__} at {site / 'featkd'}, installed files" in " ".join(report.split())
    zoo_lines = [line for line in report.splitlines() if line.startswith("zoo ")]
    assert len(zoo_lines) == len(manifest)
    for entry in manifest:  # shipped files verified; a recipe verified once built on this machine
        line = next(x for x in zoo_lines if x.split()[1] == entry["name"])
        assert "sha256 ok" in line or ("file" not in entry and ("recipe, not built" in line
                                                             or "downloaded on first use" in line)), line

    copied = run("configs", "copy", "digits-kd-resnet20-resnet8", "exp")
    assert "featkd train exp/digits-kd-resnet20-resnet8.yaml" in copied.stdout
    trained = run("train", "exp/digits-kd-resnet20-resnet8.yaml", "--out", "run", "--set", "train.epochs=1",
                  "--set", "train.num_threads=1", "--set", "train.progress=off", "--set", "train.tensorboard=false")
    assert "teacher resnet20" in trained.stdout  # zoo:digits-resnet20 from the installed wheel
    assert json.loads((work / "run" / "summary.json").read_text())["status"] == "finished"

    run("demo", "--seeds", "1", "--methods", "none", "kd", "--epochs", "1", "--jobs", "1", "--json", "demo.json")
    rows = json.loads((work / "demo.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "kd"]
    assert all(Path(r["config"]).is_relative_to(site) for r in rows) and rows[1]["teacher_test_acc"] > 95

    run("bench", "digits-smoke", "--seeds", "1", "--methods", "none", "--set", "train.epochs=1", "--no-timing",
        "--runs-dir", "bench-runs", "--results-dir", "results")
    assert json.loads((work / "bench-runs" / "none" / "seed0" / "summary.json").read_text())["status"] == "finished"
    assert [r["method"] for r in json.loads((work / "results" / "digits-smoke.json").read_text())["rows"]] == ["none"]
