"""Export a trained student alone, as TorchScript, ONNX or safetensors, and verify the file.

:func:`export_student` writes the file, loads it back with the format's own runtime and compares its outputs
with the PyTorch model's on a batch (``max abs difference``):

``torchscript``
    ``torch.jit.trace`` of the eval-mode model on two examples, saved with ``save``; checked with
    ``torch.jit.load`` on the whole batch (so a batch size baked into the trace shows up). Tracing records one
    path through Python control flow, which is all featkd's models (fx-traceable) have.
``onnx``
    ``torch.onnx.export(..., dynamo=False)``: the TorchScript-based exporter, opset 17, dynamic batch axis.
    torch >= 2.9 defaults to the ``torch.export``-based exporter, which needs the ``onnxscript`` package;
    the TorchScript-based one needs only ``onnx`` and works offline. Checked with ``onnxruntime`` (CPU) when
    it is installed; otherwise the file is checked with ``onnx.checker`` if ``onnx`` is there and the result
    says that outputs were not compared (``pip install onnxruntime``).
``safetensors``
    the ``state_dict`` (tensors only, no code: rebuild the model, then ``load_state_dict``), with the model
    name and options in the file's metadata; checked by loading it into a freshly built model with
    :func:`featkd.engine.checkpoint.load_model_weights`. Needs the optional ``safetensors`` package.

Outputs that are dicts (torchvision segmenters: ``{'out': ..., 'aux': ...}``) are compared entry by entry;
ONNX names its outputs after the keys (a tensor output is named ``output``, the input ``input``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from featkd.engine import checkpoint as ckpt
from featkd.errors import FeatkdError

FORMATS: dict[str, str] = {"torchscript": ".torchscript", "onnx": ".onnx", "safetensors": ".safetensors"}
ONNX_OPSET = 17


@dataclass
class ExportResult:
    """A written file and its check: ``max_abs_diff`` is None when outputs could not be compared."""

    path: Path
    format: str
    verified_with: str
    max_abs_diff: float | None
    outputs: dict[str, tuple[int, ...]]  # output name -> shape on the verification batch
    note: str = ""

    def describe(self, batch: int) -> str:
        """One line: what checked the file and the difference (or why there is none)."""
        shapes = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in self.outputs.items())
        if self.max_abs_diff is None:
            return f"not compared: {self.note}"
        return (f"verified with {self.verified_with} on {batch} test images: max abs difference "
                f"{self.max_abs_diff:.3g} ({shapes})")


def output_tensors(output: Any) -> dict[str, Tensor]:
    """A model output as named tensors: ``{"output": t}`` for a tensor, the entries of a dict / tuple."""
    if isinstance(output, Tensor):
        return {"output": output}
    if isinstance(output, Mapping):
        return {str(k): v for k, v in output.items() if isinstance(v, Tensor)}
    if isinstance(output, (tuple, list)):
        return {f"output{i}": v for i, v in enumerate(output) if isinstance(v, Tensor)}
    raise FeatkdError(f"cannot export a model whose output is a {type(output).__name__}")


def max_abs_diff(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> float:
    if list(expected) != list(got):
        raise FeatkdError(f"the exported model returns {list(got)}, the PyTorch model {list(expected)}")
    diffs = []
    for name, ref in expected.items():
        other = got[name].to(ref.dtype)
        if other.shape != ref.shape:
            raise FeatkdError(f"exported output {name!r} has shape {tuple(other.shape)}, "
                              f"the PyTorch model's {tuple(ref.shape)}")
        diffs.append(float((other - ref).abs().max()) if ref.numel() else 0.0)
    return max(diffs)


def export_student(
    model: nn.Module, batch: Tensor, fmt: str, path: str | Path, *,
    fresh_model: Callable[[], nn.Module] | None = None, metadata: Mapping[str, str] | None = None,
) -> ExportResult:
    """Write ``model`` (eval mode, on CPU) to ``path`` in format ``fmt`` and verify it on ``batch``.

    ``fresh_model`` builds an untrained model of the same architecture (needed for ``safetensors``, whose
    file holds weights only); ``metadata`` goes into a safetensors file's header.
    """
    if fmt not in FORMATS:
        raise FeatkdError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if batch.shape[0] < 2:
        raise FeatkdError("export needs a verification batch of at least 2 examples")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    batch = batch.cpu()
    with torch.no_grad():
        expected = output_tensors(model(batch))
    if fmt == "torchscript":
        return _torchscript(model, batch, path, expected)
    if fmt == "onnx":
        return _onnx(model, batch, path, expected)
    if fresh_model is None:
        raise FeatkdError("safetensors export needs fresh_model to verify the file")
    return _safetensors(model, batch, path, expected, fresh_model, dict(metadata or {}))


def _shapes(tensors: Mapping[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def _torchscript(model: nn.Module, batch: Tensor, path: Path, expected: dict[str, Tensor]) -> ExportResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated in favour of torch.export (2.9+)
        try:
            traced = torch.jit.trace(model, batch[:2], strict=False)
        except Exception as exc:  # tracing errors come in many types
            raise FeatkdError(f"torch.jit.trace failed: {type(exc).__name__}: {_first_line(exc)}") from None
        traced.save(str(path))
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            got = output_tensors(loaded(batch))
    return ExportResult(path, "torchscript", f"torch.jit.load (torch {torch.__version__})",
                        max_abs_diff(expected, got), _shapes(expected))


def _onnx(model: nn.Module, batch: Tensor, path: Path, expected: dict[str, Tensor]) -> ExportResult:
    names = list(expected)
    axes = {n: {0: "batch"} for n in ["input", *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter warns that it is deprecated
        try:
            torch.onnx.export(model, (batch[:2],), str(path), dynamo=False, input_names=["input"],
                              output_names=names, dynamic_axes=axes, opset_version=ONNX_OPSET)
        except ImportError as exc:
            raise FeatkdError(f"ONNX export needs the onnx package: pip install onnx ({exc})") from None
        except Exception as exc:  # exporter errors come in many types
            raise FeatkdError(f"torch.onnx.export failed: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        import onnxruntime
    except ImportError:
        try:
            import onnx

            onnx.checker.check_model(str(path))
            checked = "the file passes onnx.checker"
        except ImportError:
            checked = "the file was not checked (neither onnxruntime nor onnx is installed)"
        note = f"onnxruntime is not installed (pip install onnxruntime); {checked}"
        return ExportResult(path, "onnx", "", None, _shapes(expected), note)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(names, {"input": batch.numpy()})
    got = {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}
    return ExportResult(path, "onnx", f"onnxruntime {onnxruntime.__version__}", max_abs_diff(expected, got),
                        _shapes(expected))


def _safetensors(model: nn.Module, batch: Tensor, path: Path, expected: dict[str, Tensor],
                 fresh_model: Callable[[], nn.Module], metadata: dict[str, str]) -> ExportResult:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise FeatkdError("safetensors export needs the safetensors package: pip install safetensors") from None
    # clone: safetensors refuses tensors that share storage, and a file must not alias the live model
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", **metadata})
    fresh = fresh_model().cpu()
    ckpt.load_model_weights(fresh, path, what="exported file")
    with torch.no_grad():
        got = output_tensors(fresh.eval()(batch))
    return ExportResult(path, "safetensors", "load_state_dict into a freshly built model",
                        max_abs_diff(expected, got), _shapes(expected))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
