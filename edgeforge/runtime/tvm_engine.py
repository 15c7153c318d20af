"""Engine over a module compiled by edgeforge's TVM backend, with TVM's runtime library only.

Runs in bundles without the compiler and without numpy: relative imports, tvm_ffi (the
apache-tvm-ffi package) and libtvm_runtime, which a Linux bundle carries in runtime/tvm/lib/
(backends/tvm/device_runtime.py). TVM's own Python package is not imported here: it needs numpy
(~56 MB installed, more than everything else a TVM bundle installs on its device together) and
loads the 260 MB compiler library unless told not to. The module's functions are reached through
the runtime's registered global functions, the same ones TVM's Python wrappers call. Where the
process already imported TVM (the compiler, tests), its loaded runtime is used instead (one
libtvm_runtime a process). `compiler_loaded()` tells whether the compiler library is mapped.

Interface (docs/INTERNALS.md, Engine): reset(), prefill(ids) -> float32 [vocab],
decode(token) -> float32 [vocab], device. Logits are a numpy array where numpy is installed, else
an array.array('f') (golden checks and greedy picks work on either).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import re
import sys
from array import array
from pathlib import Path

from .bundle_errors import BundleError, CannotRunHere
from .files import artifact_file, read_json
from .loader import checked_max_length
from .memory import GIB, check_device_memory, check_memory, kv_cache_bytes, mem_available
from .weights import QdirWeights

PREFILL_CHUNK = 256  # prompt tokens per prefill call: bounds the activations' memory
PAGE_SIZE = 16
POOLED_ALLOCATOR = 2  # relax VM allocator kinds: 1 naive, 2 pooled
DEVICE_TYPES = {"cpu": 1, "llvm": 1, "cuda": 2, "vulkan": 7, "metal": 8, "rocm": 10, "opencl": 4}
# runtime.GetDeviceAttr kinds (DeviceAttrKind, tvm/runtime/device_api.h). TVM 0.27 reports total
# memory for CUDA, ROCm, Metal, OpenCL and Vulkan, available memory for CUDA (and ROCm) only.
ATTR_EXIST, ATTR_NAME, ATTR_TOTAL_MEMORY, ATTR_AVAILABLE_MEMORY = 0, 5, 14, 15
GPU_ADVICE = ("open the bundle with a smaller --ctx, or serve fewer --parallel engines (each holds its own "
              "weights and KV cache on the GPU)")
_LOADED: dict = {}  # library name -> (ctypes handle, path): loaded once a process
LIB_SUFFIXES = (".so", ".dylib")  # bundles carry Linux .so; a developer's apache-tvm on macOS has .dylib
try:  # logits as numpy arrays where numpy is installed (callers index and compare them); else array('f')
    import numpy as _np
except ImportError:
    _np = None


def import_tvm_runtime(cuda: bool = False):
    """(tvm_ffi, {tvm, tvm_path, tvm_library}) with TVM's runtime library loaded and registered."""
    with _torch_hidden():
        try:
            import tvm_ffi  # noqa: PLC0415 - after hiding torch
        except ImportError as err:
            raise CannotRunHere(f"this bundle needs tvm_ffi: pip install apache-tvm-ffi "
                                f"(requirements.txt pins the version) ({err})") from None

    tvm = sys.modules.get("tvm")
    if tvm is not None:  # the compiler (or a test) imported TVM: use the runtime it loaded
        if cuda:
            _load_cuda_runtime(tvm)
        return tvm_ffi, {"tvm": tvm.__version__, "tvm_path": str(Path(tvm.__file__).resolve().parent),
                         "tvm_library": _runtime_library(tvm)}
    pkg = _tvm_package_dir()
    libs = ["tvm_runtime"] + (["tvm_runtime_cuda"] if cuda else [])
    for name in libs:
        if name not in _LOADED:
            path = next((p for p in (pkg / "lib" / f"lib{name}{ext}" for ext in LIB_SUFFIXES) if p.is_file()),
                        pkg / "lib" / f"lib{name}.so")
            if not path.is_file():
                raise CannotRunHere(f"{path}: missing (the TVM runtime{' with CUDA' if cuda else ''} this bundle needs)")
            try:  # the runtime global, so the module's symbols resolve against it; the CUDA part local
                _LOADED[name] = (ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL if name == "tvm_runtime" else ctypes.RTLD_LOCAL), path)
            except OSError as err:
                raise CannotRunHere(f"{path}: cannot load it on this machine ({err})") from None
    return tvm_ffi, {"tvm": _package_version(pkg), "tvm_path": str(pkg), "tvm_library": str(_LOADED["tvm_runtime"][1])}


def _tvm_package_dir() -> Path:
    """The bundle's own runtime/tvm (next to this package in a bundle), else an installed apache-tvm
    (found, not imported)."""
    bundled = Path(__file__).resolve().parent.parent / "tvm"
    if (bundled / "lib").is_dir():
        return bundled
    spec = importlib.util.find_spec("tvm")
    if spec is None or not spec.origin:
        raise CannotRunHere("no TVM runtime here: this bundle carries none for this OS, and apache-tvm is not installed")
    return Path(spec.origin).resolve().parent


def _package_version(pkg: Path) -> str:
    try:
        text = (pkg / "_version.py").read_text(encoding="utf-8")
    except OSError:
        return "?"
    found = re.search(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text, re.M)
    return found.group(1) if found else "?"


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


def _logits_out(values: array):
    """numpy float32 where numpy is installed (callers index, slice and compare it), else as is."""
    return values if _np is None else _np.frombuffer(values, dtype=_np.float32)


class TvmEngine:
    def _check_tvm(self, info: dict) -> None:
        """One TVM from build to device: the version that compiled the module, and (where the process
        imported TVM) the Python package's own libtvm_runtime, not one found through
        TVM_LIBRARY_PATH or another 'tvm' distribution."""
        package, library = Path(info["tvm_path"]), Path(info["tvm_library"])
        if package not in library.parents:
            raise BundleError(f"TVM's Python package at {package} loaded libtvm_runtime from {library}: two TVM "
                              "installations are mixed (unset TVM_LIBRARY_PATH, or remove the other 'tvm' package)")
        built = (self.artifact.get("toolchain") or {}).get("apache-tvm")
        if built and built != info["tvm"]:
            raise BundleError(f"{self.artifact_dir / 'artifact.json'}: compiled with TVM {built}, but the TVM here "
                              f"({package}) is {info['tvm']}: run the bundle's own smoke.py (it carries its "
                              "TVM runtime) or install that version")

    def __init__(self, artifact_dir, weights_dir, device: str | None = None, max_seq_len: int | None = None):
        self.artifact_dir = Path(artifact_dir)
        self.artifact = read_json(self.artifact_dir / "artifact.json")
        if self.artifact.get("backend") != "tvm":
            raise BundleError(f"{self.artifact_dir / 'artifact.json'}: backend is not tvm")
        kind = device or self.artifact.get("device", "cpu")
        if kind not in DEVICE_TYPES:
            raise BundleError(f"device '{kind}': expected one of {', '.join(DEVICE_TYPES)}")
        self._ffi, info = import_tvm_runtime(cuda=kind == "cuda")
        self._check_tvm(info)
        self._fn = {name: self._ffi.get_global_func(f"runtime.{name}") for name in
                    ("TVMTensorAllocWithScope", "TVMTensorCreateView", "TVMTensorCopyFromBytes",
                     "TVMTensorCopyToBytes", "GetDeviceAttr")}
        self.dev = self._device(kind)
        self.device = "cpu" if kind in ("cpu", "llvm") else _gpu_label(self._device_name(), kind)
        # which TVM ran: the bundle's own runtime-only copy (runtime/tvm/) or one installed here
        self.runtime_info = {**info, "compiler_loaded": compiler_loaded(), "numpy_loaded": sys.modules.get("numpy") is not None}
        module_path = artifact_file(self.artifact_dir, self.artifact.get("module", "model.so"), "module")
        if module_path.suffix != ".so":
            raise BundleError(f"{module_path}: a {module_path.suffix} export must be linked by the app; it cannot run here")
        try:
            lib = self._ffi.load_module(str(module_path))
            self.vm = lib["vm_load_executable"]()
            host = [] if DEVICE_TYPES[kind] == 1 else [1, 0, POOLED_ALLOCATOR]  # shape functions run on the CPU
            self.vm["vm_initialization"](DEVICE_TYPES[kind], 0, POOLED_ALLOCATOR, *host)
        except Exception as err:  # noqa: BLE001 - TVM raises several error kinds
            raise BundleError(f"{module_path}: cannot load the compiled module ({err})") from None
        weights = QdirWeights(weights_dir)
        self.max_seq_len = checked_max_length(max_seq_len, weights.config.get("context_length"), 2048)
        self.context_length = self.max_seq_len
        spec = read_json(self.artifact_dir / "params.json").get("params", [])
        self._check_gpu_memory_before_loading(weights.config, spec)
        self.params = self._load_params(weights, spec)
        self._prefill, self._decode = self.vm["prefill"], self.vm["decode"]
        self._cache_fns = {
            name: self._ffi.get_global_func(f"vm.builtin.kv_state_{name}")
            for name in ("clear", "add_sequence", "begin_forward", "end_forward")
        }
        self._check_kv_memory(weights.config)
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

    def prefill(self, ids: list[int]):
        ids = [int(t) for t in ids]
        if not ids:
            raise BundleError("prefill: empty prompt")
        logits = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            logits = self._step(self._prefill, ids[start : start + PREFILL_CHUNK])
        return logits

    def decode(self, token: int):
        return self._step(self._decode, [int(token)])

    # ---- internals -------------------------------------------------------------------------------
    def _step(self, fn, ids: list[int]):
        if self.length + len(ids) > self.max_seq_len:
            raise BundleError(f"sequence of {self.length + len(ids)} tokens exceeds the context of {self.max_seq_len}")
        arr = self.ids_tensor(ids)
        self._cache_fns["begin_forward"](self.kv, self._shape(0), self._shape(len(ids)))
        out = fn(arr, self.kv, self.params)
        self._cache_fns["end_forward"](self.kv)
        self.length += len(ids)
        return _logits_out(self.to_host(out[0] if isinstance(out, (list, tuple)) or type(out).__name__ == "Array" else out))

    def ids_tensor(self, ids: list[int]):
        """int32 [1, len(ids)] on the engine's device."""
        tokens = array("i", ids)
        return self._tensor([1, len(ids)], "int32", [(tokens.buffer_info()[0], len(ids) * tokens.itemsize)])

    def to_host(self, tensor) -> array:
        """A float32 tensor's values, copied to this process (from the GPU: a synchronizing copy)."""
        if str(tensor.dtype) != "float32":
            raise BundleError(f"{self.artifact_dir / 'artifact.json'}: the module returned {tensor.dtype} logits, "
                              "expected float32 (recompile the bundle)")
        values = array("f", bytes(4 * _numel(tensor.shape)))
        self._fn["TVMTensorCopyToBytes"](tensor, ctypes.c_void_p(values.buffer_info()[0]), len(values) * 4)
        return values

    def sync(self) -> None:
        """Wait for the device's queued work (profiling)."""
        self._ffi.get_global_func("runtime.Device_StreamSync")(self.dev, 0)

    def _tensor(self, shape: list[int], dtype: str, parts: list[tuple[int, int]]):
        """A tensor on the engine's device filled from host memory: parts (address, bytes) in order
        (several: row blocks of a fused weight, each copied into its own view)."""
        t = self._fn["TVMTensorAllocWithScope"](self._ffi.Shape(shape), self._ffi.dtype(dtype), self.dev, None)
        if len(parts) == 1:
            self._fn["TVMTensorCopyFromBytes"](t, ctypes.c_void_p(parts[0][0]), parts[0][1])
            return t
        row_bytes = sum(n for _, n in parts) // shape[0]
        offset = 0
        for address, nbytes in parts:
            view = self._fn["TVMTensorCreateView"](t, self._ffi.Shape([nbytes // row_bytes, *shape[1:]]),
                                                   self._ffi.dtype(dtype), offset)
            self._fn["TVMTensorCopyFromBytes"](view, ctypes.c_void_p(address), nbytes)
            offset += nbytes
        return t

    def _shape(self, *dims):
        return self._ffi.Shape(dims)

    def _device(self, kind: str):
        dev = self._ffi.device("cpu" if kind == "llvm" else kind, 0)
        if kind not in ("cpu", "llvm") and not self._fn["GetDeviceAttr"](DEVICE_TYPES[kind], 0, ATTR_EXIST):
            raise BundleError(f"this module needs a {kind} device and none is present")
        return dev

    @property
    def _on_gpu(self) -> bool:
        return self.dev.dlpack_device_type() != DEVICE_TYPES["cpu"]

    def _kv_bytes(self, config: dict) -> int:
        dtype_bytes = 2 if self.artifact.get("model_dtype") == "float16" else 4
        return kv_cache_bytes(config, self.max_seq_len, dtype_bytes, PAGE_SIZE)

    def _check_gpu_memory_before_loading(self, config: dict, spec: list) -> None:
        """On a GPU: the weights and the whole paged KV cache against the device's memory, before the
        weights are copied there (refused by name instead of failing half-way through the copy)."""
        self._weight_bytes = _params_bytes(spec)
        if not self._on_gpu:
            return
        free, total = self._device_memory()
        check_device_memory(f"the weights ({(self._weight_bytes or 0) / GIB:.1f} GiB) and the KV cache for a "
                            f"context of {self.max_seq_len} tokens (--ctx; default the model's context length)",
                            (self._weight_bytes or 0) + self._kv_bytes(config), self.device, GPU_ADVICE, free, total)

    def _check_kv_memory(self, config: dict) -> None:
        """The paged KV cache is reserved whole when the engine opens (a model's default context can be
        131072 tokens): refused by name before TVM allocates it when it cannot fit: in this machine's
        memory, or on a GPU in what the device has free (the weights, copied there, are out of it) or,
        where it reports only its total, in that total less this engine's weights."""
        needed = self._kv_bytes(config)
        stage = f"the KV cache for a context of {self.max_seq_len} tokens (--ctx; default the model's context length)"
        if not self._on_gpu:
            check_memory(f"{stage} on {self.device}", needed, "open the bundle with a smaller --ctx", mem_available())
            return
        free, total = self._device_memory()
        check_device_memory(stage, needed, self.device, GPU_ADVICE, free, total, resident=self._weight_bytes or 0)

    def _device_memory(self) -> tuple[int | None, int | None]:
        """(free, total) bytes of the engine's GPU as TVM's device API reports them (None: not reported)."""
        return self._device_attr_int(ATTR_AVAILABLE_MEMORY), self._device_attr_int(ATTR_TOTAL_MEMORY)

    def _device_attr_int(self, kind: int) -> int | None:
        try:
            value = self._fn["GetDeviceAttr"](self.dev.dlpack_device_type(), 0, kind)
            return int(value) if value else None
        except Exception:  # noqa: BLE001 - not every device API reports it
            return None

    def _device_name(self) -> str | None:
        try:
            name = self._fn["GetDeviceAttr"](self.dev.dlpack_device_type(), 0, ATTR_NAME)
            return str(name) if name else None
        except Exception:  # noqa: BLE001 - not every device API reports a name
            return None

    def _load_params(self, weights: QdirWeights, spec: list):
        tensors = []
        for p in spec:
            tensor, role = _tensor_and_role(p["name"])
            sources = p.get("sources") or [tensor]  # several: stacked by rows (a fused matmul)
            stored = [weights.stored(source, role) for source in sources]
            shape = [sum(s["shape"][0] for s in stored), *stored[0]["shape"][1:]]
            if shape != p["shape"] or any(s["dtype"] != p["dtype"] or s["shape"][1:] != shape[1:] for s in stored):
                got = ", ".join(f"{s['dtype']}{s['shape']}" for s in stored)
                raise BundleError(f"{weights.path}: array '{p['name']}' is {got}, the module was compiled for "
                                  f"{p['dtype']}{p['shape']} (recompile for this QDIR)")
            tensors.append(self._tensor(shape, p["dtype"], [(s["address"], s["nbytes"]) for s in stored]))
            for source in sources:
                weights.release(source)  # copied into the runtime: the mapped pages can go
        return tensors


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _params_bytes(spec) -> int | None:
    """Bytes of the module's parameters as params.json declares them (_load_params checks each against
    its stored array); None where a shape or dtype cannot be read (then _load_params refuses it)."""
    total = 0
    try:
        for p in spec:
            bits = re.fullmatch(r"[a-z]+(\d+)", p["dtype"])
            if bits is None:
                return None
            total += -(-_numel(p["shape"]) * int(bits.group(1)) // 8)  # whole bytes
    except (KeyError, TypeError, ValueError):
        return None
    return max(total, 0)


def _gpu_label(name: str | None, kind: str) -> str:
    """'cuda:0 (NVIDIA H100 80GB HBM3)': results name the GPU that produced them."""
    return f"{kind}:0 ({name})" if name else f"{kind}:0"


def _tensor_and_role(param: str) -> tuple[str, str]:
    """'model.layers.0.mlp.up_proj.qweight' -> ('model.layers.0.mlp.up_proj.weight', 'qweight')."""
    base, role = param.rsplit(".", 1)
    return f"{base}.weight", role




def open_engine(artifact_dir, weights_dir, device=None, max_length=None) -> TvmEngine:
    """The backend registry's entry point (runtime/backends.py): the QDIR weights ship beside the module."""
    return TvmEngine(artifact_dir, weights_dir, device=device, max_seq_len=max_length)
