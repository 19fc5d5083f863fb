"""Small shared builders for the tests (real modules, no mocks)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from featkd.methods.base import BuildContext


class TinyNet(nn.Module):
    """conv(in -> width) -> ReLU -> global pool -> fc; capture points 'conv', 'act', 'fc:input'."""

    def __init__(self, width: int, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


def tiny_context(s_width: int = 2, t_width: int = 3, size: int = 4) -> BuildContext:
    torch.manual_seed(0)
    return BuildContext(teacher=TinyNet(t_width), student=TinyNet(s_width), input_shape=(1, size, size),
                        num_classes=3, device=torch.device("cpu"))


class OutputWatcher:
    """Reads a subprocess's stdout (lines) and stderr on threads, so a test can wait for a marker line (the first
    epoch's log line, say) instead of sleeping a fixed time before it signals the process."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((proc.stdout, self.lines), (proc.stderr, self.err)) if s is not None]
        for t in self._threads:
            t.start()

    def _read(self, stream, into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line)
                self._changed.notify_all()
        with self._changed:  # end of the stream: the process exited (or closed it)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 240) -> str:
        """The first stdout line that satisfies ``predicate``; fails when the process ends or ``timeout`` seconds
        pass without one."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hit = next((x for x in self.lines if predicate(x)), None)
                if hit is not None:
                    return hit
                ended = not any(t.is_alive() for t in self._threads)
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    why = f"it exited ({self.proc.poll()})" if ended else f"{timeout:g}s passed"
                    raise AssertionError(f"no {what} before {why}:\n{(''.join(self.lines + self.err))[-3000:]}")
                self._changed.wait(min(left, 1.0))  # woken by every new line

    def finish(self, timeout: float = 120) -> tuple[str, str]:
        """Wait for the process to exit; its whole stdout and stderr."""
        self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return "".join(self.lines), "".join(self.err)
