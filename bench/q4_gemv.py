"""Decode's matrix-vector products: ONNX Runtime's MatMulNBits next to a kernel that reads the bundle's bytes.

    python bench/q4_gemv.py llama32-1b                       # every layer of the 1B shape, 2 threads
    python bench/q4_gemv.py llama3-8b --layers 4 -o bench/results/q4-gemv-8b.json

Both run the same random q4 weights of a model shape's layers (fused qkv, o, fused gate/up, down; the
head is left out), one token at a time, as a decode step does:

- `mlas`: one MatMulNBits a matrix (block 32, no zero points, float32 scales and activations,
  accuracy_level 4: the x86-cpu bundle's graph), in one ONNX Runtime session. ONNX Runtime repacks each
  weight at load into MLAS's layout: 4-bit codes, a float32 scale and a float32 block sum a block, so a
  decode step reads 6 bits a weight.
- `stream`: bench/q4_gemv.c (AVX2, compiled here with cc): the same codes and fp16 scales, 4.5 bits a
  weight in one stream per 4 rows, int8 activations per block of 32 like accuracy_level 4.

Rounds are interleaved (mlas, stream, mlas, ...), medians reported. GB/s is counted on the bundle's
bytes (4.5 bits a weight) for both, so it reads as decode speed; `read_gbs` is what each one moves.
Before timing, `stream` is checked against a numpy reference of its arithmetic (and both against the
float product). Nothing here is used by edgeforge's bundles: it measures what a kernel of ours would gain.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
SOURCE = BENCH / "q4_gemv.c"
CACHE = Path(os.environ.get("EDGEFORGE_CACHE", Path.home() / ".cache" / "edgeforge")) / "bench"
BLOCK = 32


def build_kernel(cc: str = "cc") -> Path:
    """Compile q4_gemv.c once per source version (cached by its hash)."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    lib = CACHE / f"q4_gemv-{digest}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(".tmp.so")
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            raise SystemExit(f"q4_gemv: no C compiler '{cc}' here (Debian: apt-get install gcc)") from None
        if done.returncode:
            raise SystemExit(f"q4_gemv: compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        tmp.replace(lib)
    return lib


def avx2_here() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


class Kernel:
    """ctypes view of q4_gemv.c. OMP_WAIT_POLICY=active (threads spin between calls, as ONNX Runtime's
    pool does) must be set before libgomp loads, so it is set here unless the caller chose."""

    def __init__(self, lib: Path):
        os.environ.setdefault("OMP_WAIT_POLICY", "active")
        self.so = ctypes.CDLL(str(lib))
        p = ctypes.c_void_p
        self.so.q4_pack.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p]
        self.so.q4_quantize_activations.argtypes = [ctypes.c_int, p, p, p, p, p]
        self.so.q4_gemv.argtypes = [ctypes.c_int, ctypes.c_int, p, p, p, p, p, p, ctypes.c_int]
        self._bufs: dict = {}

    def pack(self, blob: np.ndarray, scales16: np.ndarray) -> np.ndarray:
        n, nb, _ = blob.shape
        if n % 4 or nb % 8:
            raise ValueError(f"rows {n} must be a multiple of 4 and K {nb * BLOCK} of 256")
        out = np.empty(n * nb * 18, np.uint8)
        self.so.q4_pack(n, nb * BLOCK, blob.ctypes.data, scales16.ctypes.data, out.ctypes.data)
        return out

    def _buffers(self, k: int) -> tuple:
        """Activation buffers for width k, made once (addresses kept: a decode step makes no arrays)."""
        if k not in self._bufs:
            arrays = (np.empty(k // 2, np.int8), np.empty(k // 2, np.int8), np.empty(k // BLOCK, np.float32),
                      np.empty(k // BLOCK, np.float32))
            self._bufs[k] = (arrays, [a.ctypes.data for a in arrays])
        return self._bufs[k]

    def gemv(self, packed: np.ndarray, n: int, x: np.ndarray, y: np.ndarray, threads: int) -> np.ndarray:
        _, ptrs = self._buffers(x.size)
        self.so.q4_quantize_activations(x.size, x.ctypes.data, *ptrs)
        self.so.q4_gemv(n, x.size, packed.ctypes.data, *ptrs, y.ctypes.data, threads)
        return y


def codes(blob: np.ndarray) -> np.ndarray:
    """[n, k/32, 16] bytes -> [n, k] codes 0..15 (low nibble = even element)."""
    return np.stack([blob & 15, blob >> 4], axis=-1).reshape(blob.shape[0], -1)


def reference(blob: np.ndarray, scales16: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic in numpy: int8 activations per block (max/127, round half to even)."""
    xb = x.reshape(-1, BLOCK).astype(np.float32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    qa = np.rint(xb * inv[:, None]).astype(np.int32)
    q = codes(blob).reshape(blob.shape[0], -1, BLOCK).astype(np.int32) - 8
    dots = np.einsum("nbj,bj->nb", q, qa).astype(np.float64)
    return (dots * scales16.astype(np.float64) * d[None, :]).sum(axis=1)


def layer_mats(shape: dict) -> list[tuple[str, int, int]]:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * shape.get("head_dim", h // shape["num_attention_heads"])
    return [("qkv", h + 2 * kv, h), ("o", h, h), ("gate_up", 2 * i, h), ("down", h, i)]


def random_weights(mats, layers: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(layers):
        for name, n, k in mats:
            blob = rng.integers(0, 256, (n, k // BLOCK, BLOCK // 2), dtype=np.uint8)
            scales16 = (rng.random((n, k // BLOCK), dtype=np.float32) * np.float32(0.02)).astype(np.float16)
            out.append((f"l{layer}.{name}", n, k, blob, scales16))
    return out


def mlas_session(weights, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    ks = sorted({k for _, _, k, _, _ in weights})
    nodes, inits, outputs = [], [], []
    for name, n, k, blob, scales16 in weights:
        inits += [numpy_helper.from_array(blob, f"{name}.qweight"),
                  numpy_helper.from_array(scales16.astype(np.float32).reshape(-1), f"{name}.scales")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{k}", f"{name}.qweight", f"{name}.scales"], [name],
                                      domain="com.microsoft", K=k, N=n, bits=4, block_size=BLOCK, accuracy_level=4))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, n]))
    graph = helper.make_graph(nodes, "q4_gemv", [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, 1, k])
                                                 for k in ks], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if model.ByteSize() < 2**31 - 2**20:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), ks
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"q4_gemv_mlas-{os.getpid()}.onnx"  # over protobuf's 2 GiB: weights beside the graph
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), ks
    finally:
        path.unlink()
        (path.parent / (path.name + ".data")).unlink()


def _setup(shape_name: str, layers: int | None):
    sys.path.insert(0, str(BENCH))
    import scale  # noqa: PLC0415  (its SHAPES: gpu.py's plus 3B and 7B)

    shape = scale.SHAPES[shape_name]
    layers = layers or shape["num_hidden_layers"]
    mats = layer_mats(shape)
    weights = random_weights(mats, layers)
    rng = np.random.default_rng(1)
    xs = {k: rng.standard_normal(k).astype(np.float32) for k in sorted({k for _, _, k in mats})}
    return layers, mats, weights, xs


def time_engine(engine: str, shape_name: str, layers: int | None, threads: int, steps: int) -> float:
    """Seconds a decode step, in this process alone (each engine in a process of its own: two thread
    pools that spin between calls would slow each other on a small machine)."""
    _, _, weights, xs = _setup(shape_name, layers)
    if engine == "mlas":
        sess, ks = mlas_session(weights, threads)
        feeds = {f"x{k}": xs[k].reshape(1, 1, k) for k in ks}

        def step():
            sess.run(None, feeds)
    else:
        kernel = Kernel(build_kernel())
        packed = [kernel.pack(blob, s16) for _, _, _, blob, s16 in weights]
        ys = {name: np.empty(n, np.float32) for name, n, _, _, _ in weights}

        def step():
            for (name, n, k, _, _), pk in zip(weights, packed):
                kernel.gemv(pk, n, xs[k], ys[name], threads)
    step()
    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def check(shape_name: str, threads: int) -> dict:
    """The kernel against its numpy reference; both engines against the float product of the codes."""
    _, _, weights, xs = _setup(shape_name, 1)
    name, n, k, blob, s16 = weights[0]
    kernel = Kernel(build_kernel())
    ours = kernel.gemv(kernel.pack(blob, s16), n, xs[k], np.empty(n, np.float32), threads)
    sess, _ = mlas_session(weights[:1], threads)
    mlas = sess.run(None, {f"x{k}": xs[k].reshape(1, 1, k)})[0].reshape(-1)
    exact = ((codes(blob).astype(np.float64) - 8) * np.repeat(s16.astype(np.float64), BLOCK, axis=1)) @ xs[k]
    scale_of = float(np.abs(exact).max())
    return {"matrix": name, "stream_vs_reference": float(np.abs(ours - reference(blob, s16, xs[k])).max() / scale_of),
            "stream_vs_float": float(np.abs(ours - exact).max() / scale_of),
            "mlas_vs_float": float(np.abs(mlas - exact).max() / scale_of)}


def run(shape_name: str, layers: int | None, threads: int, rounds: int, steps: int, log=print) -> dict:
    sys.path.insert(0, str(BENCH))
    import scale  # noqa: PLC0415

    layers = layers or scale.SHAPES[shape_name]["num_hidden_layers"]
    mats = layer_mats(scale.SHAPES[shape_name])
    weight_count = layers * sum(n * k for _, n, k in mats)
    log(f"[q4_gemv] {shape_name}: {layers} layers x {[(m, n, k) for m, n, k in mats]}, {threads} threads")
    # in a child too: this process must hold no spinning thread pool while the timed children run
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), shape_name, "--engine", "check", "--threads",
                          str(threads)], check=True, capture_output=True, text=True).stdout
    checked = json.loads(out.strip().splitlines()[-1])
    log("[q4_gemv] check: " + ", ".join(f"{key} {val:.2e}" for key, val in checked.items() if key != "matrix"))
    if checked["stream_vs_reference"] > 1e-5:
        raise SystemExit(f"q4_gemv: the kernel disagrees with its numpy reference ({checked['stream_vs_reference']:.2e})")
    times = {"mlas": [], "stream": []}
    for r in range(rounds):
        for engine in times:
            cmd = [sys.executable, str(Path(__file__).resolve()), shape_name, "--engine", engine, "--threads",
                   str(threads), "--steps", str(steps)] + (["--layers", str(layers)] if layers else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            times[engine].append(float(out.split()[-1]))
        log(f"[q4_gemv] round {r + 1}/{rounds}: " + ", ".join(f"{e} {t[-1] * 1e3:.2f} ms" for e, t in times.items()))
    bundle_bytes = weight_count * 4.5 / 8
    read_bits = {"mlas": 6.0, "stream": 4.5}
    result = {"shape": shape_name, "layers": layers, "threads": threads, "rounds": rounds, "steps": steps,
              "weights": weight_count, "bundle_mib": round(bundle_bytes / 2**20, 1), "check": checked,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "active"), "engines": {}}
    for key, ts in times.items():
        med = statistics.median(ts)
        result["engines"][key] = {"ms_per_step": round(med * 1e3, 2), "gbs": round(bundle_bytes / med / 1e9, 1),
                                  "read_gbs": round(weight_count * read_bits[key] / 8 / med / 1e9, 1),
                                  "rounds_ms": [round(t * 1e3, 2) for t in ts]}
    result["speedup"] = round(result["engines"]["mlas"]["ms_per_step"] / result["engines"]["stream"]["ms_per_step"], 2)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sys.path.insert(0, str(BENCH))
    import scale  # noqa: PLC0415

    ap.add_argument("shape", choices=sorted(scale.SHAPES), help="a bench/scale.py shape")
    ap.add_argument("--layers", type=int, default=None, help="how many layers (default: all of the shape)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="decode steps a round")
    ap.add_argument("-o", "--json-out", type=Path, default=None)
    ap.add_argument("--engine", choices=("mlas", "stream", "check"), help=argparse.SUPPRESS)  # one child
    args = ap.parse_args(argv)
    odd = [(m, n, k) for m, n, k in layer_mats(scale.SHAPES[args.shape]) if n % 4 or k % 256]
    if odd:
        print(f"q4_gemv: {args.shape}: the kernel takes rows in fours and K in multiples of 256; not {odd}",
              file=sys.stderr)
        return 2
    if not avx2_here():
        print("q4_gemv: needs an x86 CPU with AVX2, FMA and F16C", file=sys.stderr)
        return 2
    if args.engine == "check":
        print(json.dumps(check(args.shape, args.threads)))
        return 0
    if args.engine:
        print(time_engine(args.engine, args.shape, args.layers, args.threads, args.steps))
        return 0
    result = run(args.shape, args.layers, args.threads, args.rounds, args.steps)
    result["command"] = "python bench/q4_gemv.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
