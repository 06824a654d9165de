"""One runner interface over inference backends (Polygraphy's loader/runner idea).

A runner runs one graph: ``run(feeds) -> {output name: array}``. ``upload(arrays)`` places inputs that are
reused across calls (weights) where the backend wants them, once; ``run(..., keep=names)`` may leave outputs
on the device so the next graph consumes them without a host round trip. On CPU both are no-ops.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from mass_export.core.errors import ConfigError, ProviderError

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
# Providers whose tensors live in CUDA memory: inputs are bound as CUDA OrtValues.
CUDA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class Runner(Protocol):
    providers: list[str]  # what actually runs, not what was asked for
    requested: list[str]
    device: str  # "cpu" or "cuda": where the outputs ``run`` keeps stay
    input_names: list[str]
    output_names: list[str]

    def upload(self, arrays: dict[str, np.ndarray]) -> dict: ...

    def run(self, feeds: dict, keep=()) -> dict: ...


def parse_providers(providers) -> list[tuple[str, dict]]:
    """``cpu``, ``cuda``, ``cuda:1``, ``tensorrt`` or ORT names -> [(ORT provider name, options)]."""
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    import onnxruntime as ort

    known = set(ort.get_all_providers())
    parsed = []
    for spec in providers:
        name, _, device = spec.strip().partition(":")
        full = PROVIDER_NAMES.get(name.lower(), name)
        if full not in known:
            raise ConfigError(f"unknown provider {spec!r}: use {', '.join(sorted(set(PROVIDER_NAMES)))} "
                              "or an ONNX Runtime provider name")
        options = {}
        if device:
            if not device.isdigit():
                raise ConfigError(f"provider {spec!r}: the device after ':' must be a number")
            options["device_id"] = int(device)
        parsed.append((full, options))
    return parsed or [("CPUExecutionProvider", {})]


def check_providers(requested: list[str], active: list[str], strict: bool, what: str = "graph") -> None:
    """ORT falls back to CPU silently when a provider's libraries are missing: compare and say so."""
    missing = [name for name in dict.fromkeys(requested) if name not in active]
    if not missing:
        return
    message = (f"{what}: requested providers {', '.join(requested)} but running on {', '.join(active)} "
               f"({', '.join(missing)} unavailable)")
    if strict:
        raise ProviderError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class OrtRunner:
    """An ONNX Runtime session. On CUDA/TensorRT providers inputs and outputs go through IO binding."""

    def __init__(self, path: Path | str | bytes, providers=("cpu",), threads: int | None = None,
                 strict_providers: bool = False, check: bool = True, constants: dict | None = None):
        import onnxruntime as ort

        self._ort = ort
        requested = parse_providers(providers)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        # The graph's constants (SUPPLIED_AT_LOAD): ONNX Runtime copies them into the session when it is made (its
        # documented contract for add_external_initializers), so the caller's arrays may be freed afterwards.
        supplied = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                    for name, value in (constants or {}).items()}
        if supplied:
            options.add_external_initializers(list(supplied), list(supplied.values()))
        model = path if isinstance(path, bytes) else str(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ORT's own "not in available providers" warning: ours is clearer
            self.session = ort.InferenceSession(model, options, providers=requested)
        self.providers = self.session.get_providers()
        self.requested = [name for name, _ in requested]
        if check:
            name = "in-memory graph" if isinstance(path, bytes) else Path(path).name
            check_providers(self.requested, self.providers, strict_providers, name)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        on_cuda = self.providers[0] in CUDA_PROVIDERS
        self.device = "cuda" if on_cuda else "cpu"
        self.device_id = next((int(o.get("device_id", 0)) for p, o in requested if p == self.providers[0]), 0)

    def upload(self, arrays: dict[str, np.ndarray]) -> dict:
        """Inputs reused across calls: numpy on CPU, CUDA OrtValues (copied once) on a GPU provider."""
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items() if k in self.input_names}
        if self.device == "cpu":
            return arrays
        return {k: self._ort.OrtValue.ortvalue_from_numpy(v, "cuda", self.device_id) for k, v in arrays.items()}

    def run(self, feeds: dict, keep=()) -> dict:
        """Outputs by name as numpy, except those in ``keep``, left on the device as OrtValues (GPU only)."""
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise ValueError(f"missing inputs: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
        if self.device == "cpu":
            feeds = {k: v.numpy() if isinstance(v, self._ort.OrtValue) else v for k, v in feeds.items()}
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        binding, host = self.session.io_binding(), []  # host arrays must outlive the run
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                host.append(np.ascontiguousarray(value))
                binding.bind_cpu_input(name, host[-1])
        for name in self.output_names:
            binding.bind_output(name, "cuda" if name in keep else "cpu", self.device_id if name in keep else 0)
        self.session.run_with_iobinding(binding)
        return {name: value if name in keep else value.numpy()
                for name, value in zip(self.output_names, binding.get_outputs())}


def tensorrt_available() -> bool:
    import importlib

    try:
        importlib.import_module("tensorrt")
    except ImportError:  # the PyPI stub packages raise on import too when their wheels could not be fetched
        return False
    return True


# Backends by name: a new backend is one runner class (``Runner``'s interface, constructed as
# ``cls(path, providers, threads, strict_providers, check, constants)``) and one ``register_backend`` line.
BACKENDS: dict[str, type] = {}


def register_backend(runner: type, *names: str) -> type:
    for name in names:
        BACKENDS[name] = runner
    return runner


class TensorrtEngineRunner:
    """Native TensorRT engines: not implemented; says what to use instead."""

    def __init__(self, path, providers=("cpu",), threads=None, strict_providers=False, check=True, constants=None):
        if not tensorrt_available():
            raise ProviderError("backend 'tensorrt' needs the tensorrt Python package, which is not installed; "
                                "use ONNX Runtime with providers=('tensorrt',) or ('cuda',)")
        raise ProviderError("native TensorRT engines are not implemented in this version; use ONNX Runtime's "
                            "TensorRT execution provider: providers=('tensorrt',) (--providers tensorrt)")


register_backend(OrtRunner, "onnxruntime", "ort")
register_backend(TensorrtEngineRunner, "tensorrt")


def make_runner(path: Path, backend: str = "onnxruntime", providers=("cpu",), threads: int | None = None,
                strict_providers: bool = False, check: bool = True, constants: dict | None = None) -> Runner:
    """A runner of the registered ``backend`` for one graph; ``constants``: the arrays of the graph's constants
    supplied at load (``core.onnxfiles.SUPPLIED_AT_LOAD``), by name."""
    runner = BACKENDS.get(backend)
    if runner is None:
        raise ConfigError(f"unknown backend {backend!r}: choose {' or '.join(sorted(BACKENDS))}")
    return runner(path, providers, threads, strict_providers, check, constants)
