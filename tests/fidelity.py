"""Smoke fidelity harness: unseen random Llama-3-style models, their golden data, and the smoke
verdict of each compute path on them (tests/test_smoke_fidelity.py; docs/BUNDLES.md's tolerance
table was measured with it).

A sweep model is the tiny `llama32` folder (tokenizer, config) with every weight redrawn from its
own seed, the tied embedding (so the logits) scaled by `sharpness`: sharp logits are where a
tolerance of a fixed fraction of the range went wrong (issue 21).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgeforge.bundle.golden import DEFAULT_PROMPTS, make_golden, tolerance_for
from edgeforge.runtime.golden_check import run_prompt


def sweep_model(base: Path, out: Path, seed: int, sharpness: float, outliers: float = 1.0, std: float = 0.08) -> Path:
    """A copy of the HF folder `base` with fresh random weights (normal, `std`; seed), logits scaled
    by `sharpness`, and two channels of every norm weight scaled by `outliers` (the outlier features
    of real Llama models, which make a block's int8 scale coarse for its other values)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(base, out)
    rng = np.random.default_rng(seed)
    tensors = load_file(out / "model.safetensors")
    fresh = {}
    for name, t in sorted(tensors.items()):
        if name.endswith("norm.weight"):
            w = 1.0 + 0.2 * rng.standard_normal(t.shape)
            w[rng.choice(t.shape[0], 2, replace=False)] *= outliers
            fresh[name] = w.astype(t.dtype)
        else:
            fresh[name] = (std * rng.standard_normal(t.shape)).astype(t.dtype)
    fresh["model.embed_tokens.weight"] *= np.float32(sharpness)
    save_file(fresh, out / "model.safetensors", metadata={"format": "pt"})
    return out


def quantized(model_dir: Path, scheme: str, out: Path) -> Path:
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir

    write_qdir(load_model(model_dir), scheme, out)
    return out


def compiled(qdir: Path, target: str, backend: str, out: Path, kv_cache: str | None = None) -> dict:
    from edgeforge.backends import compile_qdir

    return compile_qdir(qdir, target, backend, out, kv_cache=kv_cache)


def verdict(qdir: Path, artifact_dir: Path, golden: dict, arch: str = "x86_64") -> dict:
    """The smoke verdict of the compiled artifact against `golden` with the tolerance a build gives
    it: PASS/FAIL, the worst step's error as a fraction of its own tolerance (`ratio`), how many
    steps were widened by the golden data's spreads, token agreement."""
    from edgeforge.runtime.loader import open_engine, read_artifact

    artifact = read_artifact(artifact_dir)
    rel = tolerance_for(artifact, arch)["rel"]
    weights = qdir if artifact.get("needs_weights") else None
    engine = open_engine(artifact_dir, weights)
    return _summary([run_prompt(engine, p, rel) for p in golden["prompts"]], rel)


def _summary(results: list, rel: float) -> dict:
    return {"ok": all(r["ok"] for r in results), "ratio": max(r["worst_ratio"] for r in results), "rel_tol": rel,
            "widened": sum(r["widened"] for r in results), "agree": sum(r["agree"] for r in results),
            "steps": sum(r["steps"] for r in results)}


def verdicts_under_qemu(cases: list, work: Path, timeout: float = 900) -> list[dict]:
    """verdict() of each (QDIR-less ONNX artifact folder, golden, arch) case, run by the arm64 root's
    onnxruntime under qemu (as `smoke --emulate` runs a bundle: qemu's default cortex-a76), all in one
    emulated process (tests/arm_verdicts.py)."""
    import json
    import sys

    from edgeforge.runtime.loader import read_artifact
    from edgeforge.testing import copy_runtime, run_under_qemu

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    runtime = work / "runtime"
    if not runtime.exists():
        copy_runtime(runtime)
    spec = []
    for i, (artifact_dir, golden, arch) in enumerate(cases):
        rel = tolerance_for(read_artifact(artifact_dir), arch)["rel"]
        (work / f"golden{i}.json").write_text(json.dumps(golden))
        spec.append({"artifact": str(artifact_dir), "golden": str(work / f"golden{i}.json"), "rel": rel})
    (work / "cases.json").write_text(json.dumps(spec))
    proc = run_under_qemu([Path(__file__).with_name("arm_verdicts.py"), work / "cases.json"], extra_pythonpath=[runtime],
                          timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"arm_verdicts.py under qemu exited {proc.returncode}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [_summary(r, s["rel"]) for r, s in zip(results, spec)]


HERE = Path(__file__).parent


def matmul_nbits_models(folder: Path, k: int = 256, n: int = 64) -> dict:
    """One-node MatMulNBits graphs (block 32, accuracy_level 4) in `folder` for arm_matmul_nbits.py:
    4-bit without zero points, 4-bit with zero points, 8-bit; float32 and float16. Returns
    {name: (float32 weight [n, k], the same with its scales cut to bfloat16, runs on KleidiAI, dtype)}."""
    import json

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeforge.model.reference import bf16_truncate

    rng = np.random.default_rng(5)
    out = {}
    for bits, zp, dtype in ((4, False, "float32"), (4, True, "float32"), (8, False, "float32"),
                            (4, False, "float16"), (4, True, "float16"), (8, False, "float16")):
        levels = 16 if bits == 4 else 256
        q = rng.integers(0, levels, (n, k)).astype(np.uint8)
        blob = (q[:, 0::2] | (q[:, 1::2] << 4)) if bits == 4 else q
        scales = (rng.random((n, k // 32)) * 0.05 + 0.01).astype(dtype)
        inits = [numpy_helper.from_array(blob.reshape(n, k // 32, -1), "B"), numpy_helper.from_array(scales, "S")]
        zeros = np.full((n, k // 32), levels // 2)
        if zp:
            zeros = rng.integers(0, 16, (n, k // 32))
            inits.append(numpy_helper.from_array((zeros[:, 0::2] | (zeros[:, 1::2] << 4)).astype(np.uint8), "Z"))
        elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
        node = helper.make_node("MatMulNBits", ["A", "B", "S"] + (["Z"] if zp else []), ["Y"], domain="com.microsoft",
                                K=k, N=n, bits=bits, block_size=32, accuracy_level=4)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", elem, ["M", k])],
                                  [helper.make_tensor_value_info("Y", elem, ["M", n])], initializer=inits)
        name = f"b{bits}{'z' if zp else ''}_{dtype}"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                          helper.make_opsetid("com.microsoft", 1)]), folder / f"{name}.onnx")

        def weight(s):
            return ((q.astype(np.float32).reshape(n, -1, 32) - zeros[:, :, None]) * s[:, :, None]).reshape(n, k)

        s32 = scales.astype(np.float32)
        out[name] = (weight(s32), weight(bf16_truncate(s32)), bits == 4 and not zp, dtype)
    (folder / "cases.json").write_text(json.dumps({name: v[3] for name, v in out.items()}))
    return out


def golden_for(qdir: Path, kind=("float32", None), tokens: int = 8) -> dict:
    """Golden data of `kind`, (arithmetic, dither) as golden.golden_kind gives it."""
    arithmetic, dither = kind
    return make_golden(qdir, DEFAULT_PROMPTS, tokens, arithmetic=arithmetic, dither=dither)


# ---- mutations: semantically wrong weights with consistent files ----------------------------------
# Each edits a copy of a QDIR the way a broken converter, a wrong layer map or a tampered bundle would;
# the artifact compiled from it must FAIL against the golden data of the original.

def _arrays(qdir: Path) -> tuple[dict, dict]:
    import json

    from safetensors.numpy import load_file

    quant = json.loads((qdir / "quantization.json").read_text())
    stored = {}
    for shard in sorted(qdir.glob("*.safetensors")):
        stored.update({k: (shard, v) for k, v in load_file(shard).items()})
    return quant["tensors"], stored


def _rewrite(qdir: Path, changed: dict) -> None:
    """Write back the arrays in `changed` (array key -> new array) into their shards."""
    from safetensors.numpy import load_file, save_file

    shards = {}
    for key, (shard, array) in changed.items():
        shards.setdefault(shard, {})[key] = array
    for shard, arrays in shards.items():
        data = load_file(shard)
        data.update(arrays)
        save_file(data, shard)


def _edit(qdir: Path, edits: dict) -> None:
    """edits: tensor name -> {role: f(array) -> array}, applied to the stored arrays."""
    tensors, stored = _arrays(qdir)
    changed = {}
    for name, roles in edits.items():
        for role, fn in roles.items():
            key = tensors[name]["arrays"][role]
            shard, array = stored[key]
            changed[key] = (shard, np.ascontiguousarray(fn(array.copy())))
    _rewrite(qdir, changed)


def _swap(qdir: Path, a: str, b: str) -> None:
    """Exchange two tensors' stored arrays (same format and shape)."""
    tensors, stored = _arrays(qdir)
    changed = {}
    for role in tensors[a]["arrays"]:
        ka, kb = tensors[a]["arrays"][role], tensors[b]["arrays"][role]
        changed[ka] = (stored[ka][0], stored[kb][1])
        changed[kb] = (stored[kb][0], stored[ka][1])
    _rewrite(qdir, changed)


def _config(qdir: Path, **values) -> None:
    import json

    path = qdir / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=1, sort_keys=True))


def _permute_rows(a):
    return a[np.random.default_rng(0).permutation(a.shape[0])]


L = "model.layers.{}."
MUTATIONS = {
    "scaled o_proj (x1.5)": lambda q: _edit(q, {L.format(1) + "self_attn.o_proj.weight": {"scales": lambda s: s * 1.5}}),
    "scaled down_proj (x0.5)": lambda q: _edit(q, {L.format(0) + "mlp.down_proj.weight": {"scales": lambda s: s * 0.5}}),
    "sign-flipped up_proj": lambda q: _edit(q, {L.format(0) + "mlp.up_proj.weight": {"scales": lambda s: -s}}),
    "sign-flipped v_proj": lambda q: _edit(q, {L.format(1) + "self_attn.v_proj.weight": {"scales": lambda s: -s}}),
    "permuted q_proj rows": lambda q: _edit(q, {L.format(0) + "self_attn.q_proj.weight": {"qweight": _permute_rows,
                                                                                          "scales": _permute_rows}}),
    "permuted embedding rows": lambda q: _edit(q, {"model.embed_tokens.weight": {"qweight": _permute_rows,
                                                                                 "scales": _permute_rows}}),
    "swapped gate and up": lambda q: _swap(q, L.format(1) + "mlp.gate_proj.weight", L.format(1) + "mlp.up_proj.weight"),
    "swapped layers' q_proj": lambda q: _swap(q, L.format(0) + "self_attn.q_proj.weight", L.format(1) + "self_attn.q_proj.weight"),
    "scaled input norm (x1.3)": lambda q: _edit(q, {L.format(1) + "input_layernorm.weight": {"weight": lambda w: w * 1.3}}),
    "sign-flipped final norm": lambda q: _edit(q, {"model.norm.weight": {"weight": lambda w: -w}}),
    "swapped norms": lambda q: _swap(q, L.format(0) + "input_layernorm.weight", L.format(0) + "post_attention_layernorm.weight"),
    "rope theta of Llama 2 (1e4)": lambda q: _config(q, rope_theta=10000.0),
    "rope without llama3 scaling": lambda q: _config(q, rope_scaling=None),
}


def mutated(qdir: Path, mutation: str, out: Path) -> Path:
    shutil.copytree(qdir, out)
    MUTATIONS[mutation](out)
    return out
