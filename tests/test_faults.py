"""Faults a run survives (single process): corrupt or truncated checkpoints, a full disk during a save, stop
signals mid-epoch, periodic mid-epoch checkpoints, and a second run on a folder a live run holds.

Every resumed run here is compared with the uninterrupted one bit for bit (deterministic mode, one thread).
The torchrun side (elastic restarts, multi-node, DDP stops) is in tests/test_ddp.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featkd.config import build_config
from featkd.engine import runfolder
from featkd.engine.trainer import Trainer, train
from featkd.errors import FeatkdError
from tests.helpers import OutputWatcher

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
RAW = {
    "name": "faults",
    "data": {"dataset": "digits", "batch_size": 64},  # 1347 training images: 21 steps per epoch
    "student": {"model": "plaincnn"},
    "method": {"name": "none"},
    "optim": {"lr": 0.1, "schedule": "cosine"},
    "train": {"epochs": 3, "deterministic": True, "num_threads": 1, "progress": "off", "tensorboard": False},
}
STEPS = 21
#: history keys that are timings, not results
TIMINGS = {"epoch_time", "train_images_per_s"}


def quiet(_message: str) -> None:
    pass


def cfg(**train_options):
    raw = json.loads(json.dumps(RAW))
    raw["train"].update(train_options)
    return build_config(raw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread_module):
    """The uninterrupted 3-epoch run: (result, student state)."""
    out = tmp_path_factory.mktemp("reference")
    result = train(cfg(), out, log=quiet)
    return result, torch.load(out / "student.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_run(reference, result, out: Path) -> None:
    ref_result, ref_state = reference
    state = torch.load(out / "student.pt", weights_only=True)
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=0, msg=f"{key} differs")
    assert len(result.history) == len(ref_result.history)
    for got, want in zip(result.history, ref_result.history, strict=True):
        assert {k: v for k, v in got.items() if k not in TIMINGS} == \
            {k: v for k, v in want.items() if k not in TIMINGS}


def featkd(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featkd", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout, **kw)


def write_yaml(path: Path, **train_options) -> Path:
    import yaml

    raw = json.loads(json.dumps(RAW))
    raw["train"].update(train_options)
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- 3. checkpoints that cannot be lost -------------------------------------------------------------------


def test_checksum_catches_changed_bytes_that_torch_load_accepts(tmp_path):
    state = {"format": "featkd-checkpoint", "epoch": 1, "step": 21, "weights": torch.arange(4096.0)}
    path = tmp_path / "last.pt"
    runfolder.save_checkpoint(state, path)
    assert runfolder.load_checkpoint(path)["epoch"] == 1
    data = bytearray(path.read_bytes())
    at = bytes(data).find(torch.arange(4096.0)[1000:1004].numpy().tobytes())
    assert at > 0
    data[at] ^= 0xFF  # one changed byte inside the tensor's storage
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["epoch"] == 1  # still reads: only the checksum can tell
    with pytest.raises(FeatkdError, match=r"is corrupt \(its checksum does not match"):
        runfolder.load_checkpoint(path)


def test_truncated_last_pt_resumes_from_the_previous_one_with_one_warning(tmp_path, reference, capsys):
    out = tmp_path / "run"
    train(cfg(stop_after=2), out, log=quiet)
    prev = torch.load(out / "last.prev.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    # last.prev.pt: epoch 2's training, saved before its evaluation (a fallback that loses no training)
    assert (prev["epoch"], prev["pending_eval"], last["epoch"]) == (2, True, 2) and "pending_eval" not in last
    assert "checksum" in prev and "checksum" in last
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # a save cut short (or a bad copy)
    capsys.readouterr()
    result = train(cfg(), out, resume=True, log=quiet)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featkd: warning: "), err
    assert "last.pt" in err[0] and "resuming from the previous checkpoint" in err[0], err
    assert "(epoch 2, not evaluated)" in err[0], err
    assert_same_run(reference, result, out)  # epoch 2 evaluated on resume, not trained again
    # the corrupt last.pt was not rotated into last.prev.pt: it is the final epoch's, saved before its evaluation
    prev = runfolder.load_checkpoint(out / "last.prev.pt")
    assert (prev["epoch"], prev["pending_eval"]) == (3, True)


def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead

    return preexec


def test_a_save_that_runs_out_of_space_is_one_line_and_keeps_checkpoint_and_metrics(tmp_path):
    out = tmp_path / "run"
    train(cfg(stop_after=1), out, log=quiet)
    kept = ("last.pt", "last.prev.pt", "metrics.jsonl", "metrics.csv")  # last.prev.pt: epoch 1 before evaluation
    before = {name: (out / name).read_bytes() for name in kept}
    limit = len(before["last.pt"]) // 2  # the next checkpoint cannot be written, small files still can
    proc = featkd("train", "--resume", "--out", str(out), "--set", "train.stop_after=2",
                  preexec_fn=_limit_file_size(limit))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("featkd: error: cannot write ") and "File too large" in lines[0]
    assert "last.pt (epoch 1) and the metrics are kept" in lines[0]
    for name, data in before.items():
        assert (out / name).read_bytes() == data, f"{name} changed"
    assert not list(out.glob(".*.tmp"))


# ---- 4. stop signals and mid-epoch checkpoints ------------------------------------------------------------


class Crash(Exception):
    pass


def patch_step(monkeypatch, at_step: int, action) -> None:
    """Call ``action(trainer)`` just before optimiser step ``at_step`` (0-based, global) runs."""
    original = Trainer.train_step

    def train_step(self, *args, **kwargs):
        if self.global_step == at_step:
            action(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_stop_signal_mid_epoch_checkpoints_the_step_and_resume_equals_uninterrupted(tmp_path, reference,
                                                                                     monkeypatch):
    got = []
    fallback = signal.signal(signal.SIGUSR1, lambda s, _f: got.append(s))  # without featkd's handler: ignored
    seen_lock = []
    try:
        def send(trainer):
            seen_lock.append(json.loads((out / "run.lock").read_text())["pid"])
            os.kill(os.getpid(), signal.SIGUSR1)

        out = tmp_path / "run"
        patch_step(monkeypatch, STEPS + 5, send)  # during the 6th step of epoch 2
        logs: list[str] = []
        result = Trainer(cfg(), out, log=logs.append).fit()
    finally:
        signal.signal(signal.SIGUSR1, fallback)
    assert result.status == "preempted" and result.stop_signal == signal.SIGUSR1
    assert logs[-1].startswith("stopped by SIGUSR1 at step 6/21 of epoch 2 (iteration 27)"), logs[-1]
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 6, STEPS + 6)
    assert seen_lock == [os.getpid()] and not (out / "run.lock").exists()  # held while running, then freed
    assert json.loads((out / "summary.json").read_text())["status"] == "preempted"
    monkeypatch.undo()
    resumed = Trainer(cfg(), out, resume=True, log=logs.append)
    assert "resumed from" in logs[-1] and "at step 6/21 of epoch 2" in logs[-1]
    assert_same_run(reference, resumed.fit(), out)


def test_checkpoint_every_steps_loses_at_most_that_many_steps(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"

    def crash(_trainer):
        raise Crash

    patch_step(monkeypatch, 2 * STEPS + 10, crash)  # dies before step 11 of epoch 3
    with pytest.raises(Crash):
        Trainer(cfg(checkpoint_every_steps=8), out, log=quiet).fit()
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (2, 6, 48)  # the last multiple of 8
    monkeypatch.undo()
    assert_same_run(reference, Trainer(cfg(checkpoint_every_steps=8), out, resume=True, log=quiet).fit(), out)


def test_sigterm_to_the_cli_stops_with_one_line_and_exit_143(tmp_path):
    config = write_yaml(tmp_path / "cfg.yaml", epochs=200)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "featkd", "train", str(config), "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        watch = OutputWatcher(proc)
        # the first epoch's line comes after its checkpoint, while the stop handlers are installed: the signal
        # lands in epoch 2 (or at its start)
        watch.wait_for(lambda x: x.startswith("epoch 1/"), "first epoch line")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = watch.finish(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr == ""
    stops = [x for x in stdout.splitlines() if x.startswith("stopped by SIGTERM")]
    assert len(stops) == 1 and "continue with --resume" in stops[0], stdout
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == state["epoch"] * STEPS + state["batch"] and 1 <= state["epoch"] < 200


# ---- 5. one run per folder --------------------------------------------------------------------------------


def test_a_folder_held_by_a_live_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
    config = write_yaml(tmp_path / "cfg.yaml", epochs=1)
    out = tmp_path / "run"
    lock = runfolder.RunLock(out)
    lock.acquire(quiet)  # this test process plays the live run
    try:
        proc = featkd("train", str(config), "--out", str(out))
    finally:
        lock.release()
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert f"is in use by a running featkd (pid {os.getpid()}" in lines[0]
    assert not (out / "last.pt").exists()

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no longer running
    (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    proc = featkd("train", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the stale lock {out / 'run.lock'} of pid {dead.pid}" in proc.stdout
    assert (out / "summary.json").exists() and not (out / "run.lock").exists()
