"""Real ``torchrun`` runs (gloo on CPU) against single-process runs: two processes on one node, two nodes
(agents) on one machine, and an elastic job that is stopped by SIGTERM and SIGKILLed and restarted by torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

#: Largest |w_ddp - w_single| accepted for the BatchNorm-free model. The only difference is the order of
#: floating-point sums (two half-batch means averaged by all-reduce vs one full-batch mean); over
#: 3 epochs x 21 steps of SGD it measured 3e-8 here, so 1e-4 leaves room without hiding real
#: differences (one different batch moves weights by ~1e-2).
DDP_TOLERANCE = 1e-4


def config(tmp_path: Path, model: str, name: str, epochs: int = 6) -> Path:
    raw = {
        "name": name,
        "data": {"dataset": "digits", "batch_size": 64},
        "student": {"model": model},
        "method": {"name": "none"},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": epochs, "deterministic": True, "num_threads": 1, "progress": "off",
                  "tensorboard": False},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_nobn(tmp_path_factory) -> Path:
    """The single-process run of the BatchNorm-free config that the torchrun runs below must equal."""
    tmp = tmp_path_factory.mktemp("single")
    run([sys.executable, "-m", "featkd", "train", str(config(tmp, "plaincnn", "nobn")), "--out", str(tmp / "run")])
    return tmp / "run"


def assert_equals_single(single: Path, ddp: Path) -> None:
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "finished"
    a = torch.load(single / "student.pt", weights_only=True)
    b = torch.load(ddp / "student.pt", weights_only=True)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |w_ddp - w_single| = {diff:.3e} (tolerance {DDP_TOLERANCE})")
    assert diff < DDP_TOLERANCE
    s_single = json.loads((single / "summary.json").read_text())
    assert abs(summary["test_acc"] - s_single["test_acc"]) <= 100 / 450 + 1e-9  # at most one test image


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX system")
def test_two_process_gloo_run_equals_single_process_without_batchnorm(tmp_path, single_nobn):
    cfg = config(tmp_path, "plaincnn", "nobn")
    ddp = tmp_path / "ddp"
    proc = run([*TORCHRUN, "-m", "featkd", "train", str(cfg), "--out", str(ddp)])
    # only rank 0 writes: exactly one set of outputs, one checkpoint (and the previous one)
    assert sorted(p.name for p in ddp.glob("*.pt")) == ["best.pt", "last.prev.pt", "last.pt", "student.pt"]
    assert proc.stdout.count("done: test_acc") == 1
    assert_equals_single(single_nobn, ddp)


@pytest.mark.slow
def test_two_nodes_on_one_machine_equal_the_single_process_run(tmp_path, single_nobn):
    """Two torchrun agents (one process each) meeting at a c10d rendezvous on 127.0.0.1: a global batch of
    64 over 2 nodes x 1 process gives the single-process run."""
    cfg = config(tmp_path, "plaincnn", "nobn")
    port, out = free_port(), tmp_path / "ddp"

    def agent(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=featkd-test-{port}", f"--rdzv-conf=is_host={int(rank == 0)}", "--local-addr=127.0.0.1",
               "-m", "featkd", "train", str(cfg), "--out", str(out)]
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    agents = [agent(0), agent(1)]
    try:
        outputs = [a.communicate(timeout=300) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a, (stdout, stderr) in zip(agents, outputs, strict=True):
        assert a.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    assert "".join(o for o, _ in outputs).count("done: test_acc") == 1  # one rank 0 in the whole job
    assert_equals_single(single_nobn, out)


def _workers(agent_pid: int) -> dict[int, int]:
    """``{RANK: pid}`` of a torchrun agent's worker processes (its children with RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == agent_pid else []
        except (OSError, IndexError, ValueError):
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(entry.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_elastic_job_stopped_by_sigterm_and_sigkilled_is_restarted_and_equals_single_process(tmp_path,
                                                                                            single_nobn):
    """``torchrun --max-restarts=2 ... --resume auto``: SIGTERM to rank 1 mid-epoch stops *both* ranks at the
    same step (mid-epoch checkpoint, exit 143), torchrun restarts them and they resume at that step; then
    SIGKILL of rank 0 mid-epoch (its lock left behind, the step lost) and a second restart from the last
    checkpoint. The job finishes with the student of the uninterrupted single-process run."""
    cfg = config(tmp_path, "plaincnn", "nobn")
    out = tmp_path / "ddp"
    cmd = [*TORCHRUN, "--max-restarts=2", "--monitor-interval=0.2", "-m", "featkd", "train", str(cfg),
           "--out", str(out), "--resume", "auto"]
    # restarted workers must not share the agent's rendezvous store (stale addresses: pytorch/pytorch#135712)
    env = {**ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(agent.stdout), daemon=True)
    reader.start()

    def wait_for(predicate, what: str, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while not any(predicate(x) for x in list(lines)):
            assert agent.poll() is None and time.time() < deadline, f"no {what}:\n{''.join(lines)[-4000:]}"
            time.sleep(0.02)

    try:
        wait_for(lambda x: x.startswith("epoch 1/"), "first epoch")
        os.kill(_workers(agent.pid)[1], signal.SIGTERM)
        wait_for(lambda x: "resumed from" in x and "at step" in x, "resume at the stopped step")
        wait_for(lambda x: x.startswith("epoch 3/"), "epoch after the first restart")
        os.kill(_workers(agent.pid)[0], signal.SIGKILL)
        agent.wait(timeout=300)
        reader.join(timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
    log = "".join(lines)
    assert agent.returncode == 0, log[-4000:]
    stops = [x for x in lines if x.startswith("stopped by SIGTERM at step ")]
    assert len(stops) == 1, log[-4000:]
    state_line = stops[0].split(" at step ")[1].split(" (")[0]  # "k/21 of epoch 2"
    assert f"at step {state_line}" in log.split(stops[0], 1)[1]  # the restart resumed at that very step
    assert "took over the stale lock" in log and log.count("done: test_acc") == 1
    assert_equals_single(single_nobn, out)


@pytest.mark.slow
def test_two_process_batchnorm_run_ends_with_one_model_that_scores_like_a_single_process(tmp_path):
    """On the CPU each rank normalises with its own half batch (SyncBatchNorm is CUDA-only), but the run holds
    one model: after it both ranks hold the same student bit for bit (weights through DDP, BatchNorm running
    statistics through the trainer's broadcast of rank 0's before evaluating), that is the student.pt rank 0
    saved, and the test accuracy summed over the two shards equals a single-process evaluation of it."""
    from featkd.config import load_config
    from featkd.engine.build import build_run

    cfg = config(tmp_path, "resnet8", "bn", epochs=2)
    out = tmp_path / "ddp"
    run([*TORCHRUN, "-m", "tests.rank_worker", str(cfg), str(out), "--train"])
    ranks = [torch.load(out / f"state-rank{r}.pt", weights_only=True)["student"] for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and sum("running_mean" in k for k in ranks[0]) == 9
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
    exported = torch.load(out / "run" / "student.pt", weights_only=True)
    assert exported.keys() == ranks[0].keys() and all(torch.equal(exported[k], ranks[0][k]) for k in exported)
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test_acc"] > 80
    single = build_run(load_config(cfg), log=lambda _m: None, student_checkpoint=out / "run" / "student.pt")
    result = single.evaluate(single.student)
    assert result["samples"] == 450 and result["acc"] == summary["test_acc"]


@pytest.mark.slow
def test_two_process_label_free_multi_teacher_run_equals_single_process(tmp_path):
    """issue 26: a label-free two-teacher run (the same trained digits ResNet-20 seen at 8 px and at 16 px) under
    torchrun with 2 gloo processes: each teacher's standardisation statistics are all-reduced over both shards
    and the adaptors are trained in the DDP-wrapped step, so the run equals the single-process one (fixed
    teacher weights: ``balance: equal``'s running means are per rank by construction)."""
    raw = {
        "name": "mt",
        "data": {"dataset": "digits", "batch_size": 64, "labels": "ignore"},
        "teachers": {"small": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20"},
                     "big": {"model": "resnet20", "checkpoint": "zoo:digits-resnet20", "input_size": 16}},
        "student": {"model": "plaincnn"},
        "method": {"name": "multiteacher", "pairs": [["block2", "small:layer3"], ["block2", "big:layer3"]],
                   "weights": {"small": 1.0, "big": 0.5}, "stats_images": 512, "agree_images": 0},
        "optim": {"lr": 0.05, "schedule": "cosine"},
        "train": {"epochs": 2, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False,
                  "teacher_eval": "off"},
    }
    cfg = tmp_path / "mt.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    run([sys.executable, "-m", "featkd", "train", str(cfg), "--out", str(tmp_path / "single")])
    run([*TORCHRUN, "-m", "featkd", "train", str(cfg), "--out", str(tmp_path / "ddp")])
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
    a = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    for key in ("student", "distiller"):
        sa, sb = a[key], b[key]
        assert sa.keys() == sb.keys()
        diff = max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].is_floating_point())
        print(f"{key}: max |ddp - single| = {diff:.3e}")
        assert diff < DDP_TOLERANCE, key
    assert any("mean" in k for k in a["distiller"]), "the standardisation statistics are distiller buffers"
