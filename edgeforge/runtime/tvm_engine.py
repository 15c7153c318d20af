"""Engine over a module compiled by edgeforge's TVM backend, with a runtime-only TVM.

Runs in bundles without the compiler: relative imports only; numpy + the TVM runtime. The TVM
compiler library (libtvm_compiler.so, ~260 MB) is never loaded: TVM_USE_RUNTIME_LIB=1 is set
before `import tvm` (when this process has not imported tvm yet). `compiler_loaded()` tells.

Interface (docs/INTERNALS.md, Engine): reset(), prefill(ids) -> float32 [vocab],
decode(token) -> float32 [vocab], device.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from .bundle_errors import BundleError
from .files import read_json
from .loader import checked_max_length
from .weights import QdirWeights

PREFILL_CHUNK = 256  # prompt tokens per prefill call: bounds the activations' memory
PAGE_SIZE = 16


def import_tvm_runtime():
    """Import tvm in runtime-only mode (unless the process already imported the full tvm)."""
    if "tvm" not in sys.modules:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    with _torch_hidden():
        import tvm  # noqa: PLC0415 - deliberate late import after setting the mode
        import tvm.runtime.vm  # noqa: PLC0415,F401 - registers VirtualMachine
        import tvm_ffi  # noqa: PLC0415

    return tvm, tvm_ffi


@contextlib.contextmanager
def _torch_hidden():
    """tvm_ffi imports torch eagerly whenever it is installed (for DLPack interop the engine never
    uses): ~1.7 s and ~250 MB of RSS, more than the model. Hide it while tvm loads, unless the
    process already has it; later `import torch` works as usual."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tvm_ffi expects
    try:
        yield
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def compiler_loaded() -> bool:
    """True when libtvm_compiler is mapped into this process (it should not be in bundles)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return any("libtvm_compiler" in line for line in maps)
    except OSError:  # not Linux: ask tvm what it loaded
        base = sys.modules.get("tvm.base")
        return bool(base and "tvm_compiler" in getattr(base, "_LOADED_LIBS", {}))


def _load_cuda_runtime(tvm):
    """In runtime-only mode the CUDA device API lives in a sidecar library: load it explicitly."""
    from tvm_ffi.libinfo import load_lib_ctypes  # noqa: PLC0415

    loaded = tvm.base._LOADED_LIBS  # pylint: disable=protected-access
    if "tvm_runtime_cuda" in loaded:
        return
    runtime_dir = Path(loaded["tvm_runtime"]._name).resolve().parent  # pylint: disable=protected-access
    try:
        loaded["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as err:
        raise BundleError(f"the TVM runtime has no CUDA support (libtvm_runtime_cuda): {err}") from None


def _runtime_library(tvm) -> str:
    lib = tvm.base._LOADED_LIBS.get("tvm_runtime")  # pylint: disable=protected-access
    return str(Path(lib._name).resolve()) if lib is not None else "?"  # pylint: disable=protected-access


class TvmEngine:
    def _check_tvm(self, tvm) -> None:
        """One TVM from build to device: the Python package's own libtvm_runtime (not one found through
        TVM_LIBRARY_PATH or another 'tvm' distribution), of the version that compiled the module."""
        package = Path(tvm.__file__).resolve().parent
        library = Path(_runtime_library(tvm))
        if package not in library.parents:
            raise BundleError(f"TVM's Python package at {package} loaded libtvm_runtime from {library}: two TVM "
                              "installations are mixed (unset TVM_LIBRARY_PATH, or remove the other 'tvm' package)")
        built = (self.artifact.get("toolchain") or {}).get("apache-tvm")
        if built and built != tvm.__version__:
            raise BundleError(f"{self.artifact_dir / 'artifact.json'}: compiled with TVM {built}, but the TVM here "
                              f"({package}) is {tvm.__version__}: run the bundle's own smoke.py (it carries its "
                              "TVM runtime) or install that version")

    def __init__(self, artifact_dir, weights_dir, device: str | None = None, max_seq_len: int | None = None):
        self.artifact_dir = Path(artifact_dir)
        self.artifact = read_json(self.artifact_dir / "artifact.json")
        if self.artifact.get("backend") != "tvm":
            raise BundleError(f"{self.artifact_dir / 'artifact.json'}: backend is not tvm")
        tvm, self._ffi = import_tvm_runtime()
        self._check_tvm(tvm)
        kind = device or self.artifact.get("device", "cpu")
        self.dev = self._device(tvm, kind)
        self.device = "cpu" if kind in ("cpu", "llvm") else _gpu_label(self.dev, kind)
        # which TVM ran: the bundle's own runtime-only copy (runtime/tvm/) or one installed here
        self.runtime_info = {"tvm": tvm.__version__, "tvm_path": str(Path(tvm.__file__).parent),
                             "tvm_library": _runtime_library(tvm), "compiler_loaded": compiler_loaded()}
        module_path = self.artifact_dir / self.artifact.get("module", "model.so")
        if module_path.suffix != ".so":
            raise BundleError(f"{module_path}: a {module_path.suffix} export must be linked by the app; it cannot run here")
        try:
            lib = tvm.runtime.load_module(str(module_path))
        except Exception as err:  # noqa: BLE001 - TVM raises several error kinds
            raise BundleError(f"{module_path}: cannot load the compiled module ({err})") from None
        self.vm = tvm.runtime.vm.VirtualMachine(lib, self.dev)
        self._tvm = tvm
        weights = QdirWeights(weights_dir)
        self.max_seq_len = checked_max_length(max_seq_len, weights.config.get("context_length"), 2048)
        self.context_length = self.max_seq_len
        self.params = self._load_params(weights)
        self._prefill, self._decode = self.vm["prefill"], self.vm["decode"]
        self._cache_fns = {
            name: self._ffi.get_global_func(f"vm.builtin.kv_state_{name}")
            for name in ("clear", "add_sequence", "begin_forward", "end_forward")
        }
        self.kv = self.vm["create_paged_kv_cache"](
            self._shape(1), self._shape(self.max_seq_len), self._shape(PREFILL_CHUNK), self._shape(PAGE_SIZE),
            self._shape(0),
        )
        self.length = 0
        self.reset()

    # ---- Engine interface ------------------------------------------------------------------------
    def reset(self) -> None:
        self._cache_fns["clear"](self.kv)
        self._cache_fns["add_sequence"](self.kv, 0)
        self.length = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        ids = [int(t) for t in ids]
        if not ids:
            raise BundleError("prefill: empty prompt")
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits = self._step(self._prefill, ids[start : start + PREFILL_CHUNK])
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self._step(self._decode, [int(token)])

    # ---- internals -------------------------------------------------------------------------------
    def _step(self, fn, ids: list[int]) -> np.ndarray:
        if self.length + len(ids) > self.max_seq_len:
            raise BundleError(f"sequence of {self.length + len(ids)} tokens exceeds the context of {self.max_seq_len}")
        arr = self._tvm.runtime.tensor(np.asarray([ids], dtype="int32"), self.dev)
        self._cache_fns["begin_forward"](self.kv, self._shape(0), self._shape(len(ids)))
        out = fn(arr, self.kv, self.params)
        self._cache_fns["end_forward"](self.kv)
        self.length += len(ids)
        logits = out[0] if not hasattr(out, "numpy") else out
        return logits.numpy().reshape(-1).astype(np.float32, copy=False)

    def _shape(self, *dims):
        return self._ffi.Shape(dims)

    def _device(self, tvm, kind: str):
        if kind in ("cpu", "llvm"):
            return tvm.cpu(0)
        if kind == "cuda":
            _load_cuda_runtime(tvm)
        dev = tvm.device(kind, 0)
        if not dev.exist:
            raise BundleError(f"this module needs a {kind} device and none is present")
        return dev

    def _load_params(self, weights: QdirWeights):
        spec = read_json(self.artifact_dir / "params.json").get("params", [])
        arrays = []
        for p in spec:
            tensor, role = _tensor_and_role(p["name"])
            parts = []
            for source in p.get("sources") or [tensor]:  # several: stacked by rows (a fused matmul)
                part = weights.arrays(source).get(role)
                if part is None:
                    raise BundleError(f"{weights.path}: tensor '{source}' has no '{role}' array (the module needs it)")
                parts.append(part)
            stored = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            if list(stored.shape) != p["shape"] or str(stored.dtype) != p["dtype"]:
                raise BundleError(
                    f"{weights.path}: array '{p['name']}' is {stored.dtype}{list(stored.shape)}, "
                    f"the module was compiled for {p['dtype']}{p['shape']} (recompile for this QDIR)"
                )
            arrays.append(self._tvm.runtime.tensor(np.ascontiguousarray(stored), self.dev))
            del stored, parts
            for source in p.get("sources") or [tensor]:
                weights.release(source)  # copied into the runtime: the mapped pages can go
        return arrays


def _gpu_label(dev, kind: str) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)': results name the GPU that produced them."""
    try:
        name = dev.device_name
    except Exception:  # noqa: BLE001 - not every device API reports a name
        name = None
    return f"{kind}:0 ({name})" if name else f"{kind}:0"


def _tensor_and_role(param: str) -> tuple[str, str]:
    """'model.layers.0.mlp.up_proj.qweight' -> ('model.layers.0.mlp.up_proj.weight', 'qweight')."""
    base, role = param.rsplit(".", 1)
    return f"{base}.weight", role


