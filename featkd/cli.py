"""The ``featkd`` command line: a thin layer over the library.

Each sub-command lives in ``featkd/commands/<name>.py`` with ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args)``; adding a file adds the command. Those modules import only argparse at the top (torch
and the rest inside ``run``), so ``featkd --help`` and ``featkd --version`` start fast. User errors
(:class:`FeatkdError`) are printed as one line, ``featkd: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from featkd.errors import FeatkdError

#: the order of the first commands in ``featkd --help``; any other module in featkd/commands is listed after
FIRST = ["train", "eval", "layers", "demo", "configs", "zoo"]


def discover_commands() -> dict[str, object]:
    """``{name: module}`` for every module in ``featkd/commands`` (each defines HELP, add_arguments, run)."""
    import featkd.commands as package

    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))
    names.sort(key=lambda n: (FIRST.index(n) if n in FIRST else len(FIRST), n))
    return {n: importlib.import_module(f"featkd.commands.{n}") for n in names}


def build_parser() -> argparse.ArgumentParser:
    from featkd import __version__

    parser = argparse.ArgumentParser(prog="featkd", description="Feature knowledge distillation for PyTorch.")
    parser.add_argument("--version", action="version", version=f"featkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in discover_commands().items():
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        _wait_for_the_other_ranks()
        return code
    except FeatkdError as exc:
        rank = os.environ.get("RANK", "0")
        prefix = "featkd: error: " if rank == "0" else f"featkd: error (rank {rank}): "
        print(prefix + str(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featkd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `featkd layers ... | head`: the reader left; stop quietly, as a Unix filter does (the interpreter
        # would otherwise report the failed flush of stdout at exit as well)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        _leave_process_group()


def _joined_group() -> Any:
    """``torch.distributed`` when the command joined a process group, else None (torch is not imported for it:
    ``featkd --help`` stays fast)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def _wait_for_the_other_ranks() -> None:
    """After a command that returned: every rank of its torch.distributed group waits for the others, so none
    tears the group down while rank 0 still writes its files (gloo's teardown then aborted a finished rank now and
    then: "terminate called without an active exception"). A peer that left already (it failed) ends the wait."""
    if (dist := _joined_group()) is not None:
        # RuntimeError: the peer's exit closed the connection; its own error is what the user reads
        with contextlib.suppress(RuntimeError):
            dist.barrier()


def _leave_process_group() -> None:
    """Destroy a torch.distributed group the command joined: left to interpreter shutdown, gloo's threads
    can abort the process after a finished run ("terminate called without an active exception")."""
    if (dist := _joined_group()) is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
