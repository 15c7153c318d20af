"""Engine over an ONNX Runtime session (the graph of edgeforge.backends.onnx).

Copied into bundles: imports only numpy, onnxruntime and this package (relative imports).

Speed notes: inputs and outputs are bound once (I/O binding) to buffers that live as long as the
engine; a decode step only rewrites three integers in place. Each layer's past and present KV are
bound to the *same* buffer, so GroupQueryAttention appends the new row in place instead of
copying the cache every token (on CPU the buffer grows by doubling when a sequence outgrows it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundle_errors import BundleError, CannotRunHere
from .embedding import EmbeddingTable
from .files import artifact_file, read_json
from .hostcheck import cuda_memory
from .loader import checked_max_length
from .memory import GIB, check_device_memory, check_kv_buffers, kv_buffers_bytes
from .prefix import MIN_TAIL, reusable

CPU = "CPUExecutionProvider"
DEVICE_PROVIDERS = {"cpu": CPU, "cuda": "CUDAExecutionProvider", "webgpu": "WebGpuExecutionProvider",
                    "vulkan": "WebGpuExecutionProvider", "coreml": "CoreMLExecutionProvider"}
# artifact.json kv_dtype -> the KV buffers' numpy dtype and ONNX Runtime's name of the graph's past type
# (int8: the int8 KV cache, whose static scales are initializers of the graph; model/kv_int8.py)
KV_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int8": "tensor(int8)"}
THREADS_ENV = "EDGEFORGE_THREADS"
# WebGPU sessions this process opened, kept referenced until it ends: Dawn on Mesa lavapipe crashes
# (SIGSEGV) when a WebGPU session is destroyed, so none is, and a process that opened one leaves with
# os._exit once its output is written (cli.main; smoke.py keeps its engines the same way).
WEBGPU_SESSIONS: list = []
# shared: past and present bound to one max-length buffer that GroupQueryAttention appends to in
# place (CPU, CUDA: the buffers live where the op runs). copy: past holds exactly the previous rows
# and ONNX Runtime allocates a new present each step (the classic layout); used where the KV cache
# sits in host memory but the op runs on a device (WebGPU), so each step moves `length` rows, not
# the whole buffer.
KV_MODES = {CPU: "shared", "CUDAExecutionProvider": "shared"}
FIRST_CAPACITY = 256
GPU_ADVICE = ("open the bundle with a smaller --ctx, or serve fewer --parallel engines (each holds its own "
              "KV cache on the GPU)")


CUSTOM_OP_LIBRARY = "libedgeforge_kernels.so"  # backends/onnx/kernels' build, in the artifact folder
CUSTOM_OP_CPU_FEATURES = ["avx2", "fma", "f16c"]  # what its kernels need at least


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise CannotRunHere(f"this bundle needs onnxruntime: pip install onnxruntime ({err})") from err
    return onnxruntime


class OnnxEngine:
    """reset() / prefill(ids) / decode(token) -> float32 [vocab] logits; `device` says where it ran."""

    def __init__(self, artifact_dir, device: str | None = None, threads: int | None = None,
                 max_length: int | None = None, kv_mode: str | None = None):
        self.ort = _import_ort()
        self.artifact_dir = Path(artifact_dir)
        self.info = _read_artifact(self.artifact_dir)
        self.provider, self.device_id = _pick_provider(self.info, device)
        self.num_layers = int(self.info["num_layers"])
        self.vocab_size = int(self.info["vocab_size"])
        # Graphs since artifact input "inputs_embeds" take embedding rows (see runtime/embedding.py);
        # older ones take input_ids. Checked before ONNX Runtime loads anything.
        self.embeddings = None
        if self.info.get("input") == "inputs_embeds":
            self.embeddings = EmbeddingTable(self.artifact_dir, self.info.get("embedding"), self.vocab_size,
                                             self.info.get("hidden_size", 0))
        self.max_length = checked_max_length(max_length, self.info["context_length"])
        if self.provider == "CUDAExecutionProvider":  # refused by name before anything goes to the GPU
            self._check_gpu_memory_before_loading()
        self.session = self._open_session(threads)
        self.device = _device_name(self.provider, self.device_id)
        self.context_length = self.max_length
        self.kv_dtype = _kv_dtype(self.info, self.session, self.artifact_dir)
        self.kv_mode = kv_mode or KV_MODES.get(self.provider, "copy")
        if self.kv_mode not in ("shared", "copy"):
            raise BundleError(f"kv_mode must be 'shared' or 'copy', got {self.kv_mode!r}")
        self.kv_on_cpu = self.provider != "CUDAExecutionProvider"
        self._start_sequence_state()

    # Everything above is the loaded model; below, one sequence's state (bindings, KV cache).
    SHARED = ("ort", "artifact_dir", "info", "provider", "device_id", "num_layers", "vocab_size", "embeddings",
              "session", "device", "max_length", "context_length", "kv_dtype", "kv_mode", "kv_on_cpu")

    def sibling(self) -> "OnnxEngine":
        """Another sequence on the same loaded model. An ONNX Runtime session runs concurrent calls, so a
        server's engines share the weights and one thread pool (N sessions would hold N copies of the
        weights and N pools competing for the cores); each keeps its own bindings and KV cache."""
        twin = object.__new__(OnnxEngine)
        for name in self.SHARED:
            setattr(twin, name, getattr(self, name))
        twin._start_sequence_state()
        return twin

    def _start_sequence_state(self):
        self.io = self.session.io_binding()
        self._bind_small_buffers()
        self.capacity = 0
        self.length = 0
        # The ids whose KV positions 0..n-1 hold what a prefill of them computes (runtime/prefix.py): kept
        # across reset() in the shared buffers, so the next prompt that begins alike prefills only the rest.
        self.prefilled: list[int] = []
        if self.kv_mode == "shared":
            first = FIRST_CAPACITY if self.kv_on_cpu else self.max_length
            self._allocate_kv(min(first, self.max_length))
        else:
            self._bind_copy_kv(None)

    # ---- session --------------------------------------------------------------------------------
    def _open_session(self, threads):
        ort = self.ort
        if self.provider not in ort.get_available_providers():
            raise CannotRunHere(
                f"{self.artifact_dir / 'artifact.json'}: needs {self.provider}, but this onnxruntime "
                f"({ort.__version__}) only has {', '.join(ort.get_available_providers())}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = _threads(threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._register_custom_ops(opts)
        providers = [self.provider] if self.provider == CPU else [self.provider, CPU]
        options = [{"device_id": str(self.device_id)} if self.provider == "CUDAExecutionProvider" else {}]
        options += [{}] * (len(providers) - 1)
        model = artifact_file(self.artifact_dir, self.info.get("model"), "onnx.model")
        try:
            with PageOutWhileLoading(self._data_files(model)):
                session = ort.InferenceSession(str(model), sess_options=opts, providers=providers,
                                               provider_options=options)
        except Exception as err:  # onnxruntime raises its own exception types
            raise BundleError(f"{model}: onnxruntime could not load it: {str(err).splitlines()[0]}") from err
        if self.provider == "WebGpuExecutionProvider":
            WEBGPU_SESSIONS.append(session)
        # ONNX Runtime silently drops a provider it cannot initialise (no GPU, adapter refused).
        if session.get_providers()[0] != self.provider:
            raise CannotRunHere(
                f"{model}: onnxruntime fell back to {session.get_providers()[0]} instead of {self.provider} "
                "(no usable device for it on this machine); refusing to run on the wrong device")
        release_loaded_pages(self._data_files(model))
        return session

    def _register_custom_ops(self, opts) -> None:
        """The graph's own kernels (artifact.json onnx.custom_ops: edgeforge.MatMulQ for x86 CPUs),
        a library in the artifact folder whose checksum the manifest check verified before this."""
        custom = self.info.get("custom_ops")
        if not custom:
            return
        from .hostcheck import check_cpu_features, host_arch

        # only our library, by its one name, from the artifact folder (whose files the manifest check
        # verified): an artifact.json naming another path is refused, never loaded
        if not isinstance(custom, dict) or custom.get("library") != CUSTOM_OP_LIBRARY:
            raise BundleError(f"{self.artifact_dir / 'artifact.json'}: onnx.custom_ops must name {CUSTOM_OP_LIBRARY}, "
                              f"got {custom.get('library') if isinstance(custom, dict) else custom!r}")
        library = self.artifact_dir / CUSTOM_OP_LIBRARY
        if not library.is_file():
            raise BundleError(f"{library}: missing (artifact.json's onnx.custom_ops needs it)")
        if host_arch() != "x86_64":
            raise CannotRunHere(f"cannot run here: {library.name} holds x86-64 kernels; this is {host_arch()}")
        check_cpu_features(CUSTOM_OP_CPU_FEATURES, str(self.artifact_dir))
        try:
            opts.register_custom_ops_library(str(library))
        except Exception as err:  # onnxruntime raises its own exception types
            raise BundleError(f"{library}: onnxruntime could not load edgeforge's kernels: {str(err).splitlines()[0]}") from err

    def _gpu_weights_bytes(self) -> int:
        """Bytes of the graph and its external data: the initializers ONNX Runtime puts on the GPU (an
        embedding table, runtime/embedding.py, stays in host memory)."""
        model = artifact_file(self.artifact_dir, self.info.get("model"), "onnx.model")
        return sum(p.stat().st_size for p in (model, model.with_name(model.name + ".data")) if p.is_file())

    def _check_gpu_memory_before_loading(self) -> None:
        """The weights and the KV buffers (allocated at max_length up front on CUDA) against the GPU's
        memory, before the session loads the weights there (an unknown KV dtype counts nothing here:
        _kv_dtype refuses it by name once the session is open)."""
        weights = self._gpu_weights_bytes()
        shape = (1, int(self.info["num_kv_heads"]), self.max_length, int(self.info["head_dim"]))
        dtype = KV_DTYPES.get(self.info.get("kv_dtype")) if isinstance(self.info.get("kv_dtype"), str) else None
        kv = kv_buffers_bytes(shape, self.num_layers, np.dtype(dtype).itemsize) if dtype is not None else 0
        free, total = cuda_memory(self.device_id)
        check_device_memory(f"the weights ({weights / GIB:.1f} GiB) and the KV cache for {self.max_length} positions "
                            "(--ctx; default the model's context length)", weights + kv,
                            _device_name(self.provider, self.device_id), GPU_ADVICE, free, total)

    def _data_files(self, model: Path) -> list[Path]:
        """The graph's external data files: compile.py's name and the (checked) embedding table's."""
        return sorted({model.with_name(model.name + ".data"), *(self.embeddings.files if self.embeddings else ())})

    def _bind_small_buffers(self):
        """The decode input, seqlens_k, total_sequence_length and logits: numpy arrays bound once."""
        ov = self.ort.OrtValue.ortvalue_from_numpy
        if self.embeddings is not None:
            self._decode_in = np.zeros((1, 1, self.embeddings.hidden_size), np.float32)
        else:
            self._decode_in = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros((1,), np.int32)
        self._total = np.zeros((), np.int32)
        self._logits = np.zeros((1, 1, self.vocab_size), np.float32)
        # OrtValues over CPU numpy arrays share their memory: keep both alive on self.
        self._decode_in_ov, self._seqlens_ov, self._total_ov = ov(self._decode_in), ov(self._seqlens), ov(self._total)
        self._logits_ov = ov(self._logits)
        self.io.bind_ortvalue_output("logits", self._logits_ov)

    def _allocate_kv(self, capacity: int):
        """(Re)bind every layer's shared past/present buffer with room for `capacity` positions."""
        shape = (1, int(self.info["num_kv_heads"]), capacity, int(self.info["head_dim"]))
        if self.kv_on_cpu:  # host buffers grow with the conversation: refuse by name what cannot fit
            check_kv_buffers(f"the KV cache for {capacity} positions", shape, self.num_layers,
                             np.dtype(self.kv_dtype).itemsize, "use a shorter conversation, or open the bundle with a smaller --ctx")
        else:  # CUDA: every engine (--parallel) allocates its buffers at max_length, after the weights
            free, total = cuda_memory(self.device_id)
            check_device_memory(f"the KV cache for {capacity} positions (--ctx; default the model's context length)",
                                kv_buffers_bytes(shape, self.num_layers, np.dtype(self.kv_dtype).itemsize), self.device,
                                GPU_ADVICE, free, total, resident=self._gpu_weights_bytes())
        old = getattr(self, "_kv", None)
        self._kv, self._kv_ov = [], []
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                if self.kv_on_cpu:
                    buf = np.zeros(shape, self.kv_dtype)
                    if old is not None:
                        buf[:, :, : self.length] = old[2 * i + j][:, :, : self.length]
                    value = self.ort.OrtValue.ortvalue_from_numpy(buf)
                else:
                    buf = None
                    value = self.ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", self.device_id)
                self._kv.append(buf)
                self._kv_ov.append(value)
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
                self.io.bind_ortvalue_output(f"present.{i}.{kind}", value)
        self.capacity = capacity

    # ---- Engine interface -----------------------------------------------------------------------
    def reset(self) -> None:
        self.length = 0  # shared: the buffers keep stale rows; GroupQueryAttention reads only `total` of them
        if self.kv_mode == "copy":
            self._bind_copy_kv(None)
            self.prefilled = []

    def reuse_prefix(self, prompt) -> int:
        """Right after reset(): keep the KV positions an earlier prefill computed for the start of `prompt`
        and return how many (the caller prefills the rest: at least prefix.MIN_TAIL tokens). CPU only: that a
        chunked prefill gives a whole one's numbers up to float rounding is measured for ORT's CPU kernels alone."""
        if self.kv_mode != "shared" or self.length or self.provider != CPU:
            return 0
        n = reusable(self.prefilled, prompt)
        del self.prefilled[n:]
        self.length = n
        return n

    def prefill(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64).reshape(1, -1)
        if ids.shape[1] == 0:
            raise BundleError("prefill needs at least one token")
        return self._step(ids)

    def decode(self, token: int) -> np.ndarray:
        if self.embeddings is not None:
            self._decode_in[0] = self.embeddings.rows([int(token)])
        else:
            self._decode_in[0, 0] = int(token)
        return self._step(None)

    def _bind_copy_kv(self, presents):
        """copy mode: bind past = the previous step's presents (empty at the start), presents to new buffers."""
        shape = (1, int(self.info["num_kv_heads"]), 0, int(self.info["head_dim"]))
        self._empty = np.zeros(shape, self.kv_dtype)  # kept alive: the OrtValue shares its memory
        for i in range(self.num_layers):
            for j, kind in enumerate(("key", "value")):
                if presents is None:
                    past = self.ort.OrtValue.ortvalue_from_numpy(self._empty)
                else:
                    past = presents[2 * i + j]
                self.io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", past)
                self.io.bind_output(f"present.{i}.{kind}", "cpu")
        self._presents = presents

    def _step(self, ids) -> np.ndarray:
        n = 1 if ids is None else ids.shape[1]
        total = self.length + n
        if self.kv_mode == "shared":
            self._ensure_capacity(total)
        elif total > self.max_length:
            raise BundleError(f"sequence of {total} tokens exceeds max_length {self.max_length}")
        name = "input_ids" if self.embeddings is None else "inputs_embeds"
        start, fed = self.length, None if ids is None else ids[0].tolist()
        if ids is None:
            self.io.bind_ortvalue_input(name, self._decode_in_ov)
        else:
            if self.embeddings is not None:
                ids = self.embeddings.rows(ids[0])[None]
            self._prompt_ov = self.ort.OrtValue.ortvalue_from_numpy(ids)
            self.io.bind_ortvalue_input(name, self._prompt_ov)
        self._seqlens[0] = total - 1
        self._total[...] = total
        # Rebind after writing: IOBinding copies an input to the device at bind time when the
        # consuming node runs elsewhere (WebGPU), so writing into a bound buffer would go unseen.
        self.io.bind_ortvalue_input("seqlens_k", self._seqlens_ov)
        self.io.bind_ortvalue_input("total_sequence_length", self._total_ov)
        del self.prefilled[start:]  # before the call: a failed one may have written there
        self.session.run_with_iobinding(self.io)
        if self.kv_mode == "copy":
            # get_outputs() follows the binding order: logits, then present.{i}.key/.value.
            self._bind_copy_kv(self.io.get_outputs()[1:])
        self.length = total
        # Positions start.. now hold this call's keys: a prefill's of two tokens or more (the same numbers
        # as inside a longer prefill) extends the reusable ids; a decode step's or a lone token's ends them.
        if fed is not None and len(fed) >= MIN_TAIL and len(self.prefilled) == start:
            self.prefilled.extend(fed)
        return self._logits[0, 0].copy()

    def _ensure_capacity(self, total: int):
        if total > self.max_length:
            raise BundleError(f"sequence of {total} tokens exceeds max_length {self.max_length} "
                              f"(context_length {self.info['context_length']})")
        if total > self.capacity:
            if not self.kv_on_cpu:  # device buffers are allocated at max_length up front
                raise BundleError(f"KV cache of {self.capacity} positions is full")
            capacity = self.capacity
            while capacity < total:
                capacity *= 2
            self._allocate_kv(min(capacity, self.max_length))


MADV_DONTNEED = 4  # Linux <sys/mman.h>
MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages (file pages dropped, anonymous ones swapped or kept)
PAGEOUT_EVERY_S = 0.25
EINVAL = 22


def _libc():
    """The C library this process already has, with madvise's argument types set; None off Linux."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


class PageOutWhileLoading:
    """While ONNX Runtime creates a session, every PAGEOUT_EVERY_S hand the kernel back the pages of
    the data files' mappings (Linux >= 5.4; elsewhere it does nothing).

    ORT reads each weight through its mapping of the data file and packs a copy; every page it read
    stays resident until the session exists, and that, on top of the packed copies, was the
    process's peak (1B model: 1.39x weights + KV, docs/notes/models-memory.md). MADV_PAGEOUT can do
    no harm here, unlike MADV_DONTNEED: ORT unmaps and malloc reuses addresses between our reading
    /proc/self/maps and the madvise call, and DONTNEED would zero the heap memory now there (tried:
    a crash at exit), while PAGEOUT only reclaims: a clean file page is dropped and read again from
    the file if touched, an anonymous one is swapped out or, without swap, kept."""

    def __init__(self, data_files):
        import threading

        self.paths = {str(Path(f).resolve()) for f in data_files}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgeforge-pageout", daemon=True)
        self.released = 0
        self.supported = True  # False once the kernel refused MADV_PAGEOUT (EINVAL: older than 5.4)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        try:
            self._page_out_until_stopped()
        except Exception:  # noqa: BLE001 - an optimisation: it must never break loading
            return

    def _page_out_until_stopped(self) -> None:
        import ctypes

        libc = _libc()
        if libc is None:
            return
        if not _kernel_pages_out(libc):  # older than 5.4
            self.supported = False
            return
        refused: set[tuple[int, int]] = set()
        while not self.stop.wait(PAGEOUT_EVERY_S):
            try:
                with open("/proc/self/maps") as maps:
                    ranges = [line.split(None, 5) for line in maps]
            except OSError:
                return
            for fields in ranges:
                if len(fields) == 6 and fields[5].rstrip("\n") in self.paths:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if (start, end) in refused:
                        continue
                    if libc.madvise(start, end - start, MADV_PAGEOUT) != 0:
                        if ctypes.get_errno() == EINVAL:  # this range cannot be paged out (locked): skip it
                            refused.add((start, end))
                        continue  # or it went away meanwhile: fine
                    self.released += end - start


def _kernel_pages_out(libc) -> bool:
    """Whether this kernel knows MADV_PAGEOUT: asked on a page of our own (EINVAL: it does not)."""
    import ctypes
    import mmap

    page = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        view = ctypes.c_char.from_buffer(page)
        addr = ctypes.addressof(view)
        del view  # no exported pointer may outlive the mapping
        return libc.madvise(ctypes.c_void_p(addr), mmap.PAGESIZE, MADV_PAGEOUT) == 0 or ctypes.get_errno() != EINVAL
    finally:
        page.close()


def release_loaded_pages(data_files) -> int:
    """Hand back memory that loading left resident but decoding does not use (Linux; returns bytes).

    ONNX Runtime maps the data file and copies the MatMulNBits weights into its own prepacked
    buffers; it keeps the mappings of what it did not mark as packed (the scales, ~1 bit a weight,
    now a second copy inside the packed buffers), and every page it read while packing stays
    resident. For a file mapping none of whose pages was ever written (smaps: Anonymous and Swap
    0 kB: a written page of a private mapping is an anonymous copy, in memory or swapped out; not
    Private_Dirty, which also counts the file's own dirty page-cache pages of a freshly written
    bundle), MADV_DONTNEED only drops page-table entries: a page read again later is faulted back in from
    the file, so nothing but RSS changes (pages used every step, such as norm weights, come back on
    the first step). A mapping with a written page is left alone. Then glibc is asked to return the
    heap's free pages left by the packing (malloc_trim)."""
    paths = {str(Path(f).resolve()) for f in data_files}
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return 0  # not Linux (or no /proc): nothing to do
    libc = _libc()
    if libc is None:
        return 0
    written = ("Anonymous:", "Swap:")  # either non-zero: a page holds this process's writes
    released, current = 0, None
    for line in lines + ["0-0 ---p 0 0:0 0 <end>"]:
        fields = line.split(None, 5)
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's first line: range perms offset dev inode [path]
            if current and current["path"] in paths and current["clean"] == len(written):
                if libc.madvise(current["start"], current["end"] - current["start"], MADV_DONTNEED) == 0:
                    released += current["end"] - current["start"]
            start, end = (int(x, 16) for x in fields[0].split("-"))
            current = {"start": start, "end": end, "path": fields[5] if len(fields) == 6 else "", "clean": 0}
        elif current is not None and fields[0] in written:
            current["clean"] += int(fields[1]) == 0
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return released


def _read_artifact(artifact_dir: Path) -> dict:
    path = artifact_dir / "artifact.json"
    meta = read_json(path)
    if meta.get("backend") != "onnx" or "onnx" not in meta:
        raise BundleError(f"{path}: not an ONNX artifact (backend {meta.get('backend')!r})")
    return meta["onnx"]


def _kv_dtype(info: dict, session, artifact_dir: Path):
    """The KV buffers' dtype: artifact.json's kv_dtype, which must be what the graph's past inputs are
    (an artifact that claims an int8 cache for a float graph, or the reverse, is refused by name)."""
    name = info.get("kv_dtype")
    if not isinstance(name, str) or name not in KV_DTYPES:
        raise BundleError(f"{artifact_dir / 'artifact.json'}: kv_dtype {name!r} is not one of {', '.join(KV_DTYPES)}")
    past = {i.name: i.type for i in session.get_inputs()}.get("past_key_values.0.key")
    if past != ORT_TYPES[name]:
        raise BundleError(f"{artifact_dir / 'artifact.json'}: kv_dtype {name!r}, but the graph's KV cache "
                          f"(past_key_values.0.key) is {past}: the artifact does not describe its graph")
    return KV_DTYPES[name]


def _pick_provider(info: dict, device: str | None) -> tuple[str, int]:
    """The artifact's provider, or the one `device` ('cpu', 'cuda:1', 'webgpu', ...) asks for."""
    if device is None:
        return info["execution_provider"], 0
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_PROVIDERS:
        raise BundleError(f"device '{device}': expected one of {', '.join(DEVICE_PROVIDERS)} (optionally ':N')")
    try:
        return DEVICE_PROVIDERS[kind], int(index or 0)
    except ValueError:
        raise BundleError(f"device '{device}': the index after ':' must be an integer") from None


def _device_name(provider: str, device_id: int) -> str:
    if provider == "CUDAExecutionProvider":
        return f"cuda:{device_id}"
    if provider == "WebGpuExecutionProvider":
        return "webgpu (vulkan)" if os.name == "posix" and os.uname().sysname == "Linux" else "webgpu"
    return {"CPUExecutionProvider": "cpu", "CoreMLExecutionProvider": "coreml"}.get(provider, provider)


def _threads(threads: int | None) -> int:
    """Intra-op threads: the argument, else $EDGEFORGE_THREADS, else 0 (ONNX Runtime's default)."""
    value = threads if threads is not None else os.environ.get(THREADS_ENV, "0")
    try:
        value = int(value)
    except ValueError:
        raise BundleError(f"${THREADS_ENV}={value!r}: must be an integer") from None
    if value < 0:
        raise BundleError(f"threads must be >= 0, got {value}")
    return value


def open_engine(artifact_dir, weights_dir=None, device=None, max_length=None) -> OnnxEngine:
    """The backend registry's entry point (runtime/backends.py): the weights are in the artifact
    (weights_dir is not used)."""
    return OnnxEngine(artifact_dir, device=device, max_length=max_length)
