"""Every ``$ featkd ...`` command of README.md's ```console blocks runs, so the README cannot drift from the tool.

``COMMANDS`` lists them in the README's order, each with the group it runs in, the arguments appended to make it
small (one epoch, a few images: argparse takes the last of a repeated option, so ``--n 200`` after the README's
``--n 2000`` wins), and what it must give: exit status 0, or the README's ``featkd: error: ...`` line. A command
added to, changed in or removed from the README without this list fails
:func:`test_the_list_is_the_readmes_commands`. A group's commands run one after the other in one folder, as a
reader would type them: a pip user's empty folder (the first-hour paths, copying the shipped configs), or one
whose ``configs/`` is the repository's (the tour, which names ``configs/NAME.yaml``). Where the README shows
what a command printed and the lines do not depend on timing or random draws (``featkd layers``, the error lines),
every shown line must be in the output.

The ImageFolder path runs with random weights (``--set student.options.weights=null``: no network here) at 32 px;
the CIFAR-100 path on a tiny CIFAR-100 in torchvision's pickle format.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

ONE_EPOCH = ["--epochs", "1", "--set", "train.num_threads=1", "--set", "train.progress=off",
             "--set", "train.tensorboard=false", "--set", "train.eval_every=1", "--device", "cpu"]
TINY_IMAGES = [*ONE_EPOCH, "--set", "student.options.weights=null", "--set", "data.image_size=32",
               "--set", "data.num_workers=0", "--set", "data.batch_size=6", "--set", "data.eval_batch_size=6"]
TINY_CIFAR = [*ONE_EPOCH, "--set", "data.batch_size=20", "--set", "optim.milestones=[0.5]"]
TINY_BENCH = ["--seeds", "1", "--jobs", "1", "--no-timing", "--set", "train.epochs=1", "--set", "train.eval_every=1",
              "--runs-dir", "runs/bench", "--results-dir", "bench-results"]


@dataclass(frozen=True)
class Command:
    readme: str  # the command as the README shows it (without the `$ ` and the trailing comment)
    group: str
    extra: tuple[str, ...] = ()
    error: str | None = None  # exit status 2 and this in stderr (else exit status 0)
    exact: bool = False  # every line the README shows below the command is in its output


def c(readme: str, group: str, *extra: str, error: str | None = None, exact: bool = False) -> Command:
    return Command(readme, group, tuple(extra), error, exact)


COMMANDS = [
    # Your images in 5 minutes (a pip user's empty folder with my-photos/)
    c("featkd configs copy imagefolder-none-torchvision-resnet50 .", "imagefolder", exact=True),
    c("featkd train imagefolder-none-torchvision-resnet50.yaml --data-dir my-photos", "imagefolder", *TINY_IMAGES),
    c("featkd configs copy imagefolder-mgd-amp-torchvision-resnet50-resnet18 .", "imagefolder", exact=True),
    c("featkd train imagefolder-mgd-amp-torchvision-resnet50-resnet18.yaml --data-dir my-photos", "imagefolder",
      *TINY_IMAGES),
    c("featkd eval runs/imagefolder-mgd-amp-torchvision-resnet50-resnet18", "imagefolder", "--device", "cpu"),
    c("featkd configs list imagefolder", "imagefolder"),
    # CIFAR-100 (data/cifar-100-python/ in the folder)
    c("featkd configs copy cifar100-none-resnet32x4 .", "cifar100"),
    c("featkd configs copy cifar100-dkd-resnet32x4-resnet8x4 .", "cifar100"),
    c("featkd train cifar100-none-resnet32x4.yaml --data-dir data", "cifar100", *TINY_CIFAR),
    c("featkd train cifar100-dkd-resnet32x4-resnet8x4.yaml --data-dir data", "cifar100", *TINY_CIFAR),
    # the tour's first commands, in a pip user's empty folder
    c("featkd --version", "tour", exact=True),
    c("featkd env", "tour"),
    c("featkd demo", "tour", "--seeds", "1", "--methods", "kd", "--epochs", "1", "--jobs", "1"),
    c("featkd zoo list", "tour"),
    c("featkd configs list", "tour"),
    c("featkd configs show digits-kd-resnet20-resnet8", "tour"),
    c("featkd configs copy digits-kd-resnet20-resnet8 configs", "tour"),
    c("featkd train configs/digits-kd-resnet20-resnet8.yaml --out runs/kd", "tour", *ONE_EPOCH),
    # capture points (no training)
    c("featkd layers resnet20 --input-shape 1,28,28 --filter 'add$|^layer.$'", "layers", exact=True),
    c("featkd layers torchvision:resnet18 --input-shape 3,32,32 --filter 'layer4'", "layers"),
    # train, look inside a method (Fashion-MNIST), in a folder whose configs/ is the repository's
    c("featkd train configs/digits-kd-resnet20-resnet8.yaml --set optim.lr=0.1 --seed 1 --out runs/kd-s1", "methods",
      *ONE_EPOCH),
    c("featkd match configs/fashion-mnist-mgd-amp-resnet20-resnet8.yaml --out runs/match", "methods",
      "--images", "256", "--no-plots", "--device", "cpu"),
    c("featkd search configs/fashion-mnist-dfa-resnet20-resnet8.yaml --out runs/search", "methods",
      "--epochs", "1", "--set", "data.train_subset=200", "--device", "cpu"),
    c("featkd train configs/fashion-mnist-dfa-resnet20-resnet8.yaml --set method.alpha_file=runs/search/alpha.json",
      "methods", *ONE_EPOCH, "--set", "data.train_subset=200"),
    c("featkd kernel configs/fashion-mnist-kda-resnet20-resnet8.yaml --n 2000 --out runs/kernel", "methods",
      "--n", "200", "--no-plot", "--device", "cpu"),
    c("featkd bench data-limited --jobs 2", "methods", "--methods", "none", "kd", "--set", "data.train_subset=200",
      *TINY_BENCH),
    # segmentation and detection (scenes, generated from Fashion-MNIST)
    c("featkd layers fcn_resnet8 --input-shape 3,64,64 --filter 'add$|^backbone.layer.$|classifier.4'", "layers",
      exact=True),
    c("featkd train configs/scenes-seg-mgd-amp-deeplab_resnet20-fcn_resnet8.yaml --out runs/seg-mgd", "scenes",
      *ONE_EPOCH, "--set", "data.train_subset=40"),
    c("featkd eval runs/seg-mgd", "scenes", "--device", "cpu"),
    c("featkd bench scenes-seg --jobs 2", "scenes", "--methods", "none", "--set", "data.train_subset=40", *TINY_BENCH),
    c("featkd layers fcos_resnet8 --input-shape 3,96,96 --filter 'add$|fpn\\['", "layers"),
    c("featkd train configs/scenes-det-pkd-fcos_resnet20-fcos_resnet8.yaml --out runs/det-pkd", "scenes",
      *ONE_EPOCH, "--set", "data.train_subset=24"),
    c("featkd eval runs/det-pkd", "scenes", "--device", "cpu"),
    # your own models (mynets.py and mine.yaml as the README describes them)
    c("featkd layers mynets:Net --input-shape 1,8,8 --filter '^body$|fc'", "mine", exact=True),
    c("featkd train mine.yaml --out runs/mine", "mine", *ONE_EPOCH),
    c("featkd train mine.yaml --set student.model=mynets:Nett", "mine",
      error="model 'mynets:Nett': 'mynets' ({cwd}/mynets.py) has no attribute 'Nett' (did you mean 'Net'?)"),
    c("featkd layers mynet:Net", "mine",
      error="model 'mynet:Net': no module named 'mynet' (looked in {cwd}, then sys.path; see featkd/models/user.py)"),
    # export and zoo recipes (the recipe built for one epoch first, into runs/zoo/digits-torchvision-resnet18)
    c("featkd export runs/zoo/digits-torchvision-resnet18 --format onnx", "zoo"),
    c("featkd export runs/zoo/digits-torchvision-resnet18 --format torchscript", "zoo"),
    c("featkd export runs/zoo/digits-torchvision-resnet18 --format safetensors", "zoo"),
    c("featkd zoo build digits-torchvision-resnet18 --out runs/zoo/digits-torchvision-resnet18-rebuild "
      "--set train.num_threads=1", "zoo", "--set", "train.epochs=1", "--force"),
]


def readme_console_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(command, lines shown below it)`` for every ``$ featkd ...`` line of the ```console blocks, in order;
    the command without its trailing ``# comment``."""
    found: list[tuple[str, list[str]]] = []
    block = None
    for line in text.splitlines():
        fence = re.match(r"^```(\w*)", line)
        if fence:
            block = fence.group(1) if block is None else None
            continue
        if block != "console":
            continue
        if line.startswith("$ "):
            command = re.sub(r"\s+#.*$", "", line[2:]).strip()
            found.append((command, []) if command.startswith("featkd ") else ("", []))
        elif found and found[-1][0]:
            found[-1][1].append(line)
    return [f for f in found if f[0]]


def test_the_list_is_the_readmes_commands():
    shown = [command for command, _ in readme_console_commands(README.read_text())]
    assert shown == [cmd.readme for cmd in COMMANDS]


def test_the_console_blocks_are_read_as_a_reader_sees_them():
    text = "\n".join(["```console", "$ featkd env   # one line each", "featkd 0.1.0", "$ python x.py", "out",
                      "```", "$ featkd not-in-a-block", "```bash", "$ featkd in-bash", "```"])
    assert readme_console_commands(text) == [("featkd env", ["featkd 0.1.0"])]


def setup_group(group: str, ws: Path, env: dict[str, str]) -> None:
    """The files a group's commands expect, as the README describes them."""
    if group == "imagefolder":
        from tests.test_streaming import write_jpegs

        write_jpegs(ws / "my-photos", {"train": 6, "val": 2})
    elif group == "cifar100":
        from tests.test_data import write_cifar

        write_cifar(ws / "data", 100, per_file=40)
    elif group in ("methods", "scenes", "zoo"):
        (ws / "configs").symlink_to(ROOT / "configs")
    elif group == "mine":
        (ws / "mynets.py").write_text(
            "from torch import nn\n\n\n"
            "class Net(nn.Module):\n"
            "    def __init__(self, num_classes, in_channels, width=8):\n"
            "        super().__init__()\n"
            "        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),\n"
            "                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU())\n"
            "        self.fc = nn.Linear(2 * width, num_classes)\n\n"
            "    def forward(self, x):\n"
            "        return self.fc(self.body(x).mean((2, 3)))\n")
        (ws / "mine.yaml").write_text(
            "base: base/digits.yaml\n"
            "teacher: {model: resnet20, checkpoint: zoo:digits-resnet20}\n"
            "student: {model: \"mynets:Net\", options: {width: 8}}\n"
            "method: {name: fitnets, pairs: [[body, layer1]]}\n"
            "optim: {lr: 0.2}\n")
        (ws / "base").symlink_to(ROOT / "configs" / "base")
    if group == "zoo":  # the recipe's run folder that the export commands read
        run(["featkd", "zoo", "build", "digits-torchvision-resnet18", "--out", "runs/zoo/digits-torchvision-resnet18",
             "--set", "train.epochs=1", "--set", "train.num_threads=1", "--force"], ws, env)


def run(argv: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    assert argv[0] == "featkd"
    proc = subprocess.run([sys.executable, "-m", "featkd", *argv[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def norm(line: str) -> str:
    return " ".join(line.split())


GROUPS = list(dict.fromkeys(cmd.group for cmd in COMMANDS))


@pytest.mark.slow  # each group starts a process per command (a few seconds each) and most train
@pytest.mark.parametrize("group", GROUPS)
def test_the_readmes_commands_run(group, tmp_path, request):
    pytest.importorskip("torchvision")
    if group in ("methods", "scenes"):
        request.getfixturevalue("fashion_mnist_dir")  # skipped locally / required in CI
    if group == "zoo":
        pytest.importorskip("onnx")
        pytest.importorskip("safetensors")
    ws = tmp_path / group
    ws.mkdir()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # this tree's featkd
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "FEATKD_CACHE": str(tmp_path / "cache")}
    setup_group(group, ws, env)
    shown = dict(readme_console_commands(README.read_text()))
    for cmd in (cmd for cmd in COMMANDS if cmd.group == group):
        proc = run([*shlex.split(cmd.readme), *cmd.extra], ws, env, check=cmd.error is None)
        if cmd.error is not None:
            want = "featkd: error: " + cmd.error.format(cwd=ws.resolve())
            assert proc.returncode == 2 and want in proc.stderr, (cmd.readme, proc.stderr[-2000:])
            readme_line = next(line for line in shown[cmd.readme] if line.startswith("featkd: error: "))
            # the README shows the folder it ran in: the rest of the line is what this run printed
            assert re.sub(r"/\S+?(?=/mynets\.py|,| then)", "{cwd}", readme_line) == \
                "featkd: error: " + cmd.error, cmd.readme
        if cmd.exact:
            output = {norm(line) for line in (proc.stdout + proc.stderr).splitlines()}
            missing = [line for line in shown[cmd.readme] if line.strip() not in ("", "...")
                       and norm(line) not in output]
            assert not missing, (cmd.readme, missing, proc.stdout[-2000:])
