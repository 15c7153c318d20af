"""Smoke fidelity: no false FAIL on unseen random models, every semantic mutation caught, and the
tolerance a bundle claims bounded by the verifier (issue 21, item 1; docs/BUNDLES.md "Tolerances").

The sweep models are new random Llama-3-style models (tests/fidelity.py): seeds the rest of the
suite does not use, sharp logits, outlier channels and wide weights (where int8 activations hurt
most). Each case compiles the QDIR for x86 and runs the smoke verdict of the compiled engine against
golden data computed in the artifact's arithmetic, with the verifier's tolerance for its path.
Counts are printed (CI logs show them).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

import fidelity as F
from bundle_helpers import cli, host_bundle, resign  # noqa: F401 - host_bundle is a fixture
from edgeforge.bundle.golden import golden_kind, golden_of
from edgeforge.model.reference import bf16_truncate, int8_blocks, int8_rows
from edgeforge.runtime.loader import read_artifact

SCHEMES = ("q4f16", "q4f32", "q8f16")
# (seed, sharpness, outliers, std): plain, sharp logits, outlier channels, wide weights
MODELS = ((101, 1, 1, 0.08), (102, 12, 1, 0.08), (103, 1, 30, 0.08), (104, 8, 10, 0.08), (105, 1, 1, 0.4),
          (106, 8, 30, 0.3), (107, 4, 30, 0.2))
# Unseen models that amplify one flipped int8 code into a false FAIL without golden spreads: which code
# flips depends on the CPU's float order, so one amplifier per host kind the suite has run on. Seed 208
# q8f16: 0.094 of the logit range on session 10's host (AVX-512 VNNI); no flip in sessions 16 (AMD Zen 3,
# AVX2) and 17 (AMD Zen 4, AVX-512 VNNI). Seed 221 q4f32: 1.29x its bound in both of those (found in
# session 16 among seeds 209-239 with the same settings).
AMPLIFIERS = (((208, 4, 30, 0.2), "q8f16"), ((221, 4, 30, 0.2), "q4f32"))
TVM_MODELS = MODELS[2:4]


@pytest.fixture(scope="module")
def sweep(tiny_model, tmp_path_factory):
    """(model folder, scheme) -> (QDIR, {arithmetic: golden}) for every sweep case, made on first use."""
    root = tmp_path_factory.mktemp("fidelity")
    made = {}

    def get(spec, scheme):
        if (spec, scheme) not in made:
            seed, sharp, outliers, std = spec
            model = root / f"m{seed}"
            if not model.exists():
                F.sweep_model(tiny_model("llama32"), model, seed, sharp, outliers=outliers, std=std)
            made[(spec, scheme)] = (F.quantized(model, scheme, root / f"q{seed}-{scheme}"), {})
        return made[(spec, scheme)]

    return get, root


def _verdict(sweep, spec, scheme, backend, qdir=None):
    get, root = sweep
    base, goldens = get(spec, scheme)
    qdir = qdir or base
    out = root / f"a-{qdir.name}-{backend}"
    if not out.exists():
        F.compiled(qdir, "x86-cpu", backend, out)
    kind = golden_kind(read_artifact(out), "x86_64")
    if kind not in goldens:
        goldens[kind] = F.golden_for(base, kind)
    return F.verdict(qdir, out, goldens[kind])


def _report(capsys, what: str, cases: list) -> None:
    with capsys.disabled():
        print(f"\n{what}: {len(cases)} cases, " + ", ".join(f"{k} {v}" for k, v in _count(cases).items()))


def _count(cases):
    out = {}
    for ok in cases:
        out[ok] = out.get(ok, 0) + 1
    return out


def test_int8_blocks_is_onnx_runtimes_rounding():
    """The reference's emulation of MatMulNBits accuracy_level 4 (int8 inputs in blocks of 32)
    matches ONNX Runtime to float rounding, for 4- and 8-bit weights, with outlier inputs; without
    it the difference is ~5e4 times larger."""
    from onnx_support import matmul_nbits  # noqa: PLC0415

    rng = np.random.default_rng(7)
    a = (rng.standard_normal((3, 128)) * 2).astype(np.float32)
    a[:, 5] = 30.0
    for bits in (4, 8):
        w, run = matmul_nbits(rng, 128, 64, bits)
        engine = run(a, accuracy_level=4)
        exact = np.abs(engine - a @ w.T).max()
        emulated = np.abs(engine - int8_blocks(a) @ w.T).max()
        assert emulated < 1e-4 * np.abs(engine).max(), (bits, emulated)
        assert exact > 100 * emulated, (bits, exact, emulated)


def test_int8_rows_and_bf16_truncate():
    """The aarch64 emulation's pieces (ONNX Runtime's KleidiAI path; Session 10 of docs/notes/bundle.md):
    one asymmetric int8 grid per row spanning [min(0, min), max(0, max)] in 255 steps, the row's
    extremes kept to float rounding; scales cut (not rounded) to bfloat16."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 96)) * 3).astype(np.float32)
    x[1] = np.abs(x[1])  # all positive: the grid starts at 0
    x[2, 7] = 80.0  # an outlier sets the step of its whole row, not of one block of 32
    y = int8_rows(x)
    lo, hi = np.minimum(0, x.min(-1)), np.maximum(0, x.max(-1))
    step = (hi - lo) / 255
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.all(np.abs(y - x) <= step[:, None] * 0.5001)
    for row, s in zip(y, step):
        assert len(np.unique(np.rint((row - row.min()) / s))) <= 256
    assert np.all(np.abs(int8_rows(np.zeros((2, 32), np.float32))) == 0)
    s = np.array([1.0, 0.1, 3.14159, -0.0123, 65504.0], np.float32)
    cut = bf16_truncate(s)
    assert np.all(cut.view(np.uint32) & 0xFFFF == 0) and np.all(np.abs(cut) <= np.abs(s))
    assert np.all(np.abs(s - cut) < np.abs(s) * 2.0 ** -7) and cut[0] == 1.0


@pytest.mark.arm
def test_int8_emulation_is_aarch64_onnx_runtimes_rounding(tmp_path):
    """One MatMulNBits node per weight kind (4-bit without and with zero points, 8-bit; float32 and
    float16), run by the arm64 root's onnxruntime under qemu (cortex-a76, as smoke --emulate): the
    golden arithmetic of aarch64 bundles (reference.int8_rows + bf16_truncate for 4-bit without zero
    points, int8_blocks for the others) matches it to float rounding (float16: to its output's
    rounding), where float32 differs by ~1e-2 of the output."""
    pytest.importorskip("onnx")
    from edgeforge import toolchains
    from edgeforge.testing import run_under_qemu

    if toolchains.arm64_root() is None:
        pytest.skip("the arm64 root is not built (scripts/setup-arm64.sh)")
    weights = F.matmul_nbits_models(tmp_path, k=256, n=64)
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((5, 256)) * 2).astype(np.float32)
    a[:, 5], a[2, 40] = 30.0, -25.0
    np.save(tmp_path / "a.npy", a)
    proc = run_under_qemu([F.HERE / "arm_matmul_nbits.py", tmp_path], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for name, (w_float, w_cut, kleidi, dtype) in weights.items():
        x = a.astype(dtype).astype(np.float32)
        emulated = int8_rows(x) @ w_cut.T if kleidi else int8_blocks(x) @ w_float.T
        for m in ("M5", "M1"):
            y = out[f"{name}_{m}"]
            scale = np.abs(y).max()
            err, plain = np.abs(y - emulated).max() / scale, np.abs(y - x @ w_float.T).max() / scale
            print(f"{name} {m}: emulation {err:.1e}, float32 {plain:.1e}")
            assert err < (1e-5 if dtype == "float32" else 1e-3), (name, m, err)
            assert plain > 10 * err, (name, m, plain, err)


# seeds no other test uses: a plain model, sharp + outliers, and two whose float16 graphs FAILed at the
# old fixed 1.2e-1 (session 11's unseen sweep: 0.14 and 0.21 of the range at one step)
ARM_MODELS = ((211, 1, 1, 0.08), (212, 8, 10, 0.08), (237, 5, 15, 0.4), (241, 1, 40, 0.3))


@pytest.mark.slow  # under qemu (about 40 s here: 12 compiles, 8 golden sets, one emulated process)
@pytest.mark.arm
def test_sweep_and_mutations_aarch64_onnx(sweep, capsys):
    """rpi5 ONNX bundles under qemu, golden data in the aarch64 int8 arithmetic: no false FAIL on
    unseen models (float32 and float16 compute), and mutated weights still FAIL."""
    from edgeforge import toolchains

    if toolchains.arm64_root() is None:
        pytest.skip("the arm64 root is not built (scripts/setup-arm64.sh)")
    get, root = sweep
    cases, labels = [], []
    for spec in ARM_MODELS:
        for scheme in ("q4f32", "q4f16"):
            base, goldens = get(spec, scheme)
            variants = [(base, None, None)]
            if scheme == "q4f32":  # the int8 KV cache (float32 compute only): its own golden arithmetic
                variants += [(base, None, "int8")]
            if spec == ARM_MODELS[0]:  # a 1.5x o_proj on a plain model passed the old 1.2e-1
                variants += [(F.mutated(base, m, root / f"armmut{i}-{scheme}"), m, None)
                             for i, m in enumerate(("sign-flipped v_proj", "scaled o_proj (x1.5)"))]
                if scheme == "q4f32":
                    variants += [(root / "armmut1-q4f32", "scaled o_proj (x1.5)", "int8")]
            for qdir, mutation, kv in variants:
                out = root / f"arm-{qdir.name}{'-kv8' if kv else ''}"
                if not out.exists():
                    F.compiled(qdir, "rpi5", "onnx", out, kv_cache=kv)
                # golden data of the unmutated model, in the artifact's arithmetic (an int8 KV cache's
                # rounds by the scales compiled into the unmutated `out`, made after the float one)
                kind = golden_kind(read_artifact(out), "aarch64")
                if kind not in goldens:
                    goldens[kind] = (golden_of(goldens, base, read_artifact(out), "aarch64", out) if kv
                                     else F.golden_for(base, kind))
                cases.append((out, goldens[kind], "aarch64"))
                labels.append((spec, scheme, kv, mutation))
    results = F.verdicts_under_qemu(cases, root / "arm-run")
    sweep_ok = ["PASS" if r["ok"] else "false FAIL" for r, l in zip(results, labels) if l[3] is None]
    caught = ["caught" if not r["ok"] else "MISSED" for r, l in zip(results, labels) if l[3] is not None]
    _report(capsys, "fidelity sweep (onnx, aarch64 under qemu)", sweep_ok)
    _report(capsys, "mutation suite (onnx, aarch64 under qemu)", caught)
    with capsys.disabled():
        for r, l in zip(results, labels):
            print(f"  {l}: worst step {r['ratio']:.2f} of its tolerance (rel {r['rel_tol']}, {r['widened']} of "
                  f"{r['steps']} steps widened)")
    assert sweep_ok == ["PASS"] * 12 and caught == ["caught"] * 5


def test_sweep_onnx_no_false_fail(sweep, capsys):
    """Every (model, scheme) of the sweep PASSes on ONNX Runtime's x86 path (int8 activations):
    with float32 golden data and the old fixed 4e-2, 18 of 32 such cases were false FAILs."""
    results = {(spec, s): _verdict(sweep, spec, s, "onnx") for spec in MODELS for s in SCHEMES}
    _report(capsys, "fidelity sweep (onnx, x86)", ["PASS" if r["ok"] else "false FAIL" for r in results.values()])
    bad = {k: v for k, v in results.items() if not v["ok"]}
    assert not bad


def test_sweep_and_mutations_int8_kv_x86(sweep, capsys):
    """The int8 KV cache on x86 (`--kv-cache int8`: Hadamard-rotated keys and values, golden data that
    rounds them as the graph stores them, spreads that dither those roundings too): every sweep model
    PASSes, and mutated weights compiled with the same cache FAIL against the unmutated golden data."""
    get, root = sweep
    results, caught = [], []
    for spec in MODELS:
        base, goldens = get(spec, "q4f32")
        out = root / f"a-{base.name}-onnx-kv8"
        if not out.exists():
            F.compiled(base, "x86-cpu", "onnx", out, kv_cache="int8")
        kind = golden_kind(read_artifact(out), "x86_64")
        if kind not in goldens:  # its scales and rotation are the compiled graph's; prompts from another kind's
            goldens.setdefault(("float32", None), F.golden_for(base))
            goldens[kind] = golden_of(goldens, base, read_artifact(out), "x86_64", out)
        results.append(F.verdict(base, out, goldens[kind]))
        if spec == MODELS[3]:
            for i, name in enumerate(("sign-flipped v_proj", "scaled o_proj (x1.5)")):
                qdir = F.mutated(base, name, root / f"kv8mut{i}")
                F.compiled(qdir, "x86-cpu", "onnx", root / f"a-{qdir.name}-kv8", kv_cache="int8")
                caught.append(not F.verdict(qdir, root / f"a-{qdir.name}-kv8", goldens[kind])["ok"])
    _report(capsys, "fidelity sweep (onnx, x86, int8 KV cache)", ["PASS" if r["ok"] else "false FAIL" for r in results])
    _report(capsys, "mutation suite (onnx, x86, int8 KV cache)", ["caught" if c else "MISSED" for c in caught])
    with capsys.disabled():
        print("  worst steps:", [round(r["ratio"], 2) for r in results])
    assert all(r["ok"] for r in results) and caught == [True, True]


def test_an_amplifying_model_passes_by_its_measured_spread(sweep, capsys):
    """An amplifier flips an int8 code at a rounding boundary that the engine's float order and the
    reference's disagree on, and amplifies it past the x86 bound at one step: with its golden spreads
    (reference runs dithered by the path's 1e-4) that step's tolerance widens and the verdict is PASS;
    the same golden data without spreads is a false FAIL (session 10's). Every amplifier passes with
    its spreads; at least one (the one of this host's kind) fails without them."""
    import copy

    get, root = sweep
    false_fails = []
    for spec, scheme in AMPLIFIERS:
        result = _verdict(sweep, spec, scheme, "onnx")
        qdir, goldens = get(spec, scheme)
        (golden,) = goldens.values()
        bare = copy.deepcopy(golden)
        for prompt in bare["prompts"]:
            for step in prompt["steps"]:
                del step["spread"]
        without = F.verdict(qdir, root / f"a-{qdir.name}-onnx", bare)
        with capsys.disabled():
            print(f"\namplifier (seed {spec[0]} {scheme}, x86): with spreads {result}; without {without}")
        assert result["ok"] and 0 < result["widened"] < result["steps"], (spec, scheme, result)
        if not without["ok"]:
            assert without["ratio"] > 1, without
            false_fails.append((spec[0], scheme))
    assert false_fails, "no amplifier flips on this CPU: find one of its kind (the comment above AMPLIFIERS)"


@pytest.mark.slow  # a TVM compile is ~13 s here
def test_sweep_tvm_no_false_fail(sweep, capsys):
    results = {(spec, s): _verdict(sweep, spec, s, "tvm") for spec in TVM_MODELS for s in SCHEMES}
    _report(capsys, "fidelity sweep (tvm, x86)", ["PASS" if r["ok"] else "false FAIL" for r in results.values()])
    assert not {k: v for k, v in results.items() if not v["ok"]}


def _mutations(sweep, backend, capsys):
    get, root = sweep
    spec, scheme = MODELS[3], "q4f16"
    base, _ = get(spec, scheme)
    caught = {}
    for i, name in enumerate(F.MUTATIONS):
        qdir = F.mutated(base, name, root / f"mut{i}-{scheme}-{backend}")
        caught[name] = not _verdict(sweep, spec, scheme, backend, qdir)["ok"]
    _report(capsys, f"mutation suite ({backend})", ["caught" if c else "MISSED" for c in caught.values()])
    return caught


def test_mutations_caught_onnx(sweep, capsys):
    caught = _mutations(sweep, "onnx", capsys)
    assert all(caught.values()), [k for k, v in caught.items() if not v]
    assert len(caught) >= 13


@pytest.mark.slow  # 13 TVM compiles
def test_mutations_caught_tvm(sweep, capsys):
    caught = _mutations(sweep, "tvm", capsys)
    assert all(caught.values()), [k for k, v in caught.items() if not v]


# ---- the verifier bounds what a bundle claims ---------------------------------------------------

def _fresh(host_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(host_bundle[0], bundle)
    return bundle


def _edit_golden(bundle, edit):
    golden = json.loads((bundle / "golden.json").read_text())
    edit(golden)
    (bundle / "golden.json").write_text(json.dumps(golden))
    resign(bundle)


@pytest.mark.parametrize("rel", [0.5, 1e9, float("nan"), -1, 0, "0.01", True])
def test_claimed_tolerance_is_capped(host_bundle, tmp_path, capsys, rel):
    """A re-checksummed bundle that claims a wider (or nonsense) tolerance is refused by name."""
    bundle = _fresh(host_bundle, tmp_path)
    _edit_golden(bundle, lambda g: g["tolerance"].update(rel=rel))
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2, err
    assert "golden.json: tolerance" in err and "Traceback" not in err


def test_golden_of_another_arithmetic_is_refused(host_bundle, tmp_path, capsys):
    bundle = _fresh(host_bundle, tmp_path)
    _edit_golden(bundle, lambda g: g.update(arithmetic="float32"))
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "needs 'int8-activations' golden data" in err, err


def _steps(golden):
    return [step for prompt in golden["prompts"] for step in prompt["steps"]]


@pytest.mark.parametrize("spread", [float("nan"), float("inf"), -0.1, "0.1", True, None, [0.1]])
def test_a_nonsense_spread_is_refused(host_bundle, tmp_path, capsys, spread):
    bundle = _fresh(host_bundle, tmp_path)
    _edit_golden(bundle, lambda g: _steps(g)[0].update(spread=spread))
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "golden.json: every step's spread must be a finite number" in err, err


def test_spreads_may_widen_at_most_nine_tenths_of_the_steps(host_bundle, tmp_path, capsys):
    """A re-checksummed bundle that widens every step (to hide a wrong artifact) is refused by name;
    one that widens the most allowed keeps a tenth of its steps at the path's own bound, and an
    artifact compiled from sign-flipped weights still FAILs there."""
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir
    from edgeforge.runtime.manifest_check import MAX_WIDENED_SHARE

    bundle = _fresh(host_bundle, tmp_path)
    _edit_golden(bundle, lambda g: [step.update(spread=0.25) for step in _steps(g)])
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "golden steps need a tolerance wider than 0.03 (the most is 90%)" in err, err

    def widen_most(golden):
        steps = _steps(golden)
        for step in steps[: int(MAX_WIDENED_SHARE * len(steps))]:
            step["spread"] = 10.0  # capped at WIDEST of the range
    bundle = _fresh(host_bundle, tmp_path / "most")
    _edit_golden(bundle, widen_most)
    code, out, err = cli(capsys, "smoke", bundle)
    assert code == 0 and "steps widened by the model's measured sensitivity" in err + out, err
    qdir = tmp_path / "qdir"
    write_qdir(load_model(host_bundle[2]["model"]), "q4f32", qdir)
    shutil.rmtree(bundle / "artifact")
    F.compiled(F.mutated(qdir, "sign-flipped up_proj", tmp_path / "bad"), "x86-cpu", "onnx", bundle / "artifact")
    resign(bundle)
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 1 and "FAIL" in err, err


def test_spreads_of_another_dither_or_on_a_float_path_are_refused(host_bundle, tmp_path, capsys):
    bundle = _fresh(host_bundle, tmp_path)
    _edit_golden(bundle, lambda g: g["sensitivity"].update(dither=0.5))
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "spreads measured with dither 0.5, but a int8-activations-x86_64 bundle's is 0.0001" in err, err
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.manifest_check import check_tolerance

    (tmp_path / "f" / "artifact").mkdir(parents=True)
    (tmp_path / "f" / "artifact" / "artifact.json").write_text(json.dumps({"backend": "tvm", "model_dtype": "float32"}))
    golden = {"tolerance": {"rel": 1e-3}, "prompts": [{"steps": [{"spread": 0.0}]}], "sensitivity": {"dither": 1e-5}}
    (tmp_path / "f" / "golden.json").write_text(json.dumps(golden))
    with pytest.raises(BundleError, match="a float32 bundle's is None"):
        check_tolerance(tmp_path / "f", {"target": {"arch": "x86_64"}})


def test_a_widened_step_is_capped_and_still_needs_the_golden_token():
    from edgeforge.runtime.golden_check import compare_step
    from edgeforge.runtime.manifest_check import WIDEST

    step = {"top_ids": [0, 1], "top_logits": [10.0, 0.0], "max": 10.0, "min": 0.0, "spread": 100.0}
    assert compare_step([10.0 - 10 * WIDEST * 0.99, 0.0], step, 0, 0.03)["ok"]
    assert not compare_step([10.0 - 10 * WIDEST * 1.01, 0.0], step, 0, 0.03)["ok"]
    assert compare_step([10.0, 0.0], {**step, "spread": 0.0}, 0, 0.03)["widened"] is False
    flipped = compare_step([4.0, 6.0], step, 0, 0.03)  # within the widened tolerance, but argmax 1, a gap of 10
    assert not flipped["ok"] and flipped["widened"]


def test_build_refuses_golden_data_that_would_widen_too_many_steps(tiny_model, tmp_path):
    """make_bundle checks the spreads as the verifier will, before anything reaches -o."""
    from edgeforge.bundle.pack import make_bundle
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.targets import get_target

    qdir = tmp_path / "q"
    write_qdir(load_model(tiny_model("llama32")), "q4f32", qdir)
    golden = F.golden_for(qdir, ("int8-activations", 1e-4), tokens=3)
    for step in _steps(golden):
        step["spread"] = 0.2
    with pytest.raises(BundleError, match="amplifies the rounding of the int8-activations-x86_64 compute path"):
        make_bundle(tmp_path / "out", qdir, get_target("x86-cpu"), "onnx", golden)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # through build's per-bundle path (a 3B-shaped random model met it): a refusal, exit 2, not an internal error
    from edgeforge.bundle.build import _one

    result = _one((tmp_path / "out", qdir, get_target("x86-cpu"), "onnx", golden, False, None, None, None))
    assert not result["ok"] and not result.get("internal") and "amplifies the rounding" in result["error"]
    assert not (tmp_path / "out").exists()


def test_mutated_bundle_with_valid_checksums_fails_smoke(host_bundle, tiny_model, tmp_path, capsys):
    """End to end: the bundle's artifact swapped for one compiled from sign-flipped weights, the
    manifest rewritten so every checksum is valid: `edgeforge smoke` says FAIL (exit 1)."""
    from edgeforge.model.loader import load_model
    from edgeforge.quant.qdir import write_qdir

    bundle = _fresh(host_bundle, tmp_path)
    qdir = tmp_path / "qdir"
    write_qdir(load_model(tiny_model("llama32")), "q4f32", qdir)  # what the build quantized (deterministic)
    bad = F.mutated(qdir, "sign-flipped up_proj", tmp_path / "bad")
    shutil.rmtree(bundle / "artifact")
    F.compiled(bad, "x86-cpu", "onnx", bundle / "artifact")
    resign(bundle)
    code, _, err = cli(capsys, "smoke", bundle)
    assert code == 1, err
    assert "FAIL" in err or "FAIL" in _, err


@pytest.mark.parametrize("target,artifact,golden", [
    ("rpi5", {}, {"tolerance": {"rel": 1e-3}}),
    ({"arch": ["x"]}, [], {"tolerance": {"rel": 1e-3}}),
    ({}, {"onnx": "x", "device": 3}, []),
    ({}, {"onnx": {"accuracy_level": [4]}}, {"tolerance": "wide"}),
    ({}, {}, {"tolerance": {"rel": 1e-3}, "arithmetic": ["float32"]}),
    ({}, {}, {"tolerance": {"rel": 1e400}}),
])
def test_check_tolerance_refuses_garbage_by_name(tmp_path, target, artifact, golden):
    """Consistent checksums over nonsense: a BundleError naming the file, never another exception."""
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.manifest_check import check_tolerance

    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "artifact.json").write_text(json.dumps(artifact))
    (tmp_path / "golden.json").write_text(json.dumps(golden))
    with pytest.raises(BundleError, match=r"golden\.json|manifest\.json"):
        check_tolerance(tmp_path, {"target": target})


# int8 KV caches are built on float32 graphs only (compile.py refuses the others by name)

# the smallest golden data the verifier accepts: one prompt, a prefill and a decode step, top 2
_ONE_PROMPT = {"top_k": 2, "prompts": [{"prompt_ids": [1], "tokens": [3, 0], "steps": [
    {"top_ids": [3, 0], "top_logits": [2.0, 1.0], "max": 2.0, "min": -1.0},
    {"top_ids": [0, 2], "top_logits": [1.5, 0.5], "max": 1.5, "min": -2.0}]}]}


@pytest.mark.parametrize("compute,kv", [("float32", "float"), ("float16", "float"), ("float32", "int8")])
def test_old_aarch64_golden_data_is_refused(tmp_path, compute, kv):
    """An aarch64 ONNX CPU bundle at accuracy_level 4 built before Session 10 carries float32 golden
    data: the verifier refuses it (rebuild), and accepts the same bundle with golden data in the
    aarch64 int8 arithmetic within the cap."""
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.manifest_check import INT8_ACTIVATIONS_ARM, INT8_KV, TOLERANCES, check_tolerance

    onnx = {"execution_provider": "CPUExecutionProvider", "accuracy_level": 4, "compute_dtype": compute,
            "kv_dtype": "int8" if kv == "int8" else compute}
    suffix = INT8_KV if kv == "int8" else ""
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "artifact.json").write_text(json.dumps({"backend": "onnx", "device": "cpu", "onnx": onnx}))
    manifest = {"target": {"name": "rpi5", "arch": "aarch64"}}
    if kv == "int8":
        manifest["kv_cache"] = {"dtype": "int8"}
    cap = TOLERANCES["int8-activations-aarch64" + suffix][1]
    for arithmetic, ok in (("float32" + suffix, False), ("int8-activations" + suffix, False),
                           (INT8_ACTIVATIONS_ARM + suffix, True)):
        (tmp_path / "golden.json").write_text(json.dumps({"arithmetic": arithmetic, "tolerance": {"rel": cap}, **_ONE_PROMPT}))
        if ok:
            check_tolerance(tmp_path, manifest)
        else:
            with pytest.raises(BundleError, match=re.escape(f"needs '{INT8_ACTIVATIONS_ARM + suffix}' golden data")):
                check_tolerance(tmp_path, manifest)
    (tmp_path / "golden.json").write_text(json.dumps({"arithmetic": INT8_ACTIVATIONS_ARM + suffix,
                                                      "tolerance": {"rel": cap * 1.01}, **_ONE_PROMPT}))
    with pytest.raises(BundleError, match="tolerance"):
        check_tolerance(tmp_path, manifest)


def test_runs_side_by_side_are_the_single_reference(tiny_model):
    """reference.Runs (the spreads' dithered runs, weights read once for all): without noise each run
    gives the single-sequence reference's logits, at prefill (in chunks) and at decode."""
    from edgeforge.model.loader import load_model
    from edgeforge.model.reference import ReferenceModel

    model = load_model(tiny_model("llama32"))
    single, runs = ReferenceModel(model, chunk=4), ReferenceModel(model, chunk=4).runs(3)
    ids = [1, 5, 9, 2, 7, 3, 8, 4, 6, 11]
    want, got = single.prefill(ids), runs.prefill(ids)
    assert got.shape == (3, want.shape[0])
    np.testing.assert_allclose(got, np.tile(want, (3, 1)), atol=1e-5 * np.abs(want).max())
    for token in (12, 13):
        want, got = single.decode(token), runs.decode(token)
        np.testing.assert_allclose(got, np.tile(want, (3, 1)), atol=1e-5 * np.abs(want).max())


def _forge(golden, step_edit):
    for prompt in golden["prompts"]:
        for step in prompt["steps"]:
            step_edit(step)


@pytest.mark.parametrize("name,edit,words", [
    # every id of a step with all values 0 and an infinite range: a comparison that cannot fail
    ("vacuous", lambda g: _forge(g, lambda s: s.update(top_ids=list(range(64)), top_logits=[0.0] * 64,
                                                       max=1e30, min=-1e30)), "top_ids must be 8 distinct token ids"),
    ("max past the top logit", lambda g: _forge(g, lambda s: s.update(max=1e30)), "max must be the first top logit"),
    ("infinite max", lambda g: _forge(g, lambda s: s.update(max=float("inf"))), "max must be the first top logit"),
    ("rising top logits", lambda g: _forge(g, lambda s: s.update(top_logits=s["top_logits"][::-1])),
     "top_logits must be 8 finite numbers, largest first"),
    ("another golden token", lambda g: g["prompts"][0]["tokens"].__setitem__(0, g["prompts"][0]["steps"][0]["top_ids"][1]),
     "is not the step's top id"),
    # steps nobody compares, padding the widening cap's count
    ("unused steps", lambda g: g["prompts"][0]["steps"].extend(g["prompts"][0]["steps"]), "steps for"),
    ("prefill only", lambda g: [p.update(tokens=p["tokens"][:1], steps=p["steps"][:1]) for p in g["prompts"]],
     "no prompt has a decode step"),
    ("top_k", lambda g: g.update(top_k=10**6), "top_k 1000000 is not an integer"),
])
def test_golden_steps_that_could_make_a_comparison_vacuous_are_refused(host_bundle, tmp_path, capsys, name, edit, words):
    """A re-checksummed (unsigned) golden.json cannot widen what a step accepts: every step must be what
    step_summary writes of real logits, one a golden token, and some prompt must decode."""
    bundle = _fresh(host_bundle, tmp_path)
    _edit_golden(bundle, edit)
    code, out, err = cli(capsys, "smoke", bundle)
    assert code == 2 and words in err and "PASS" not in out, (name, out, err)


def test_a_rewritten_minimum_does_not_widen_the_tolerance(host_bundle, tmp_path, capsys):
    """min is the one number of a step the verifier cannot check without the model: a golden.json whose
    min says -1e30 (a tolerance of 3e28) still FAILs an engine two ranges away, because a step's
    tolerance is capped at twice the logit range the engine itself shows."""
    bundle = _fresh(host_bundle, tmp_path)

    def shift(step):
        moved = 2 * (step["max"] - step["min"])
        step.update(top_logits=[v + moved for v in step["top_logits"]], max=step["max"] + moved, min=-1e30)

    _edit_golden(bundle, lambda g: _forge(g, shift))
    code, out, err = cli(capsys, "smoke", bundle, "--json")
    assert code == 1 and json.loads(out)["status"] == "FAIL", (out, err)
    assert json.loads(out)["tolerance"] < 1e3


def test_a_golden_id_past_the_vocabulary_is_a_bundle_error_not_a_crash():
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.golden_check import compare_step

    step = {"top_ids": [0, 5], "top_logits": [1.0, 0.5], "max": 1.0, "min": 0.0}
    with pytest.raises(BundleError, match="token id 5 is past the model's 3 logits"):
        compare_step([1.0, 0.5, 0.0], step, 0, 0.03)


def test_a_folder_that_cannot_be_listed_is_refused_not_skipped(host_bundle, tmp_path, monkeypatch):
    """os.walk silently skips a folder it cannot list (mode 0311 for another user): an unlisted file
    in it would go unseen. The verifier refuses the bundle instead (simulated: tests run as root)."""
    import os as os_module

    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.manifest_check import verify_bundle

    bundle = _fresh(host_bundle, tmp_path)
    real = os_module.scandir

    def scandir(path="."):
        if os_module.path.basename(os_module.fspath(path)) == "runtime":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os_module, "scandir", scandir)
    with pytest.raises(BundleError, match="runtime: cannot list this folder"):
        verify_bundle(bundle)


@pytest.mark.parametrize("where", ["absolute", "../", "subfolder"])
def test_an_artifact_naming_a_model_outside_its_folder_is_refused(host_bundle, tmp_path, capsys, where):
    """artifact.json's onnx.model must be a file of the artifact folder, which the manifest hashes: a
    re-checksummed bundle pointing at a model elsewhere (changeable without touching the bundle) is refused."""
    bundle = _fresh(host_bundle, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(bundle / "artifact" / "model.onnx", outside / "model.onnx")
    name = {"absolute": str(outside / "model.onnx"), "../": "../../outside/model.onnx", "subfolder": "x/model.onnx"}[where]
    art = json.loads((bundle / "artifact" / "artifact.json").read_text())
    art["onnx"]["model"] = name
    (bundle / "artifact" / "artifact.json").write_text(json.dumps(art))
    resign(bundle)
    code, out, err = cli(capsys, "smoke", bundle)
    assert code == 2 and "onnx.model" in err and "is not a file name in the artifact folder" in err, (out, err)


def test_artifact_file_names_only_plain_files_of_the_folder(tmp_path):
    from edgeforge.runtime.bundle_errors import BundleError
    from edgeforge.runtime.files import artifact_file

    assert artifact_file(tmp_path, "model.so", "module") == tmp_path / "model.so"
    for bad in ("/lib/x.so", "../x.so", "a/b.so", "", ".", "..", None, 3, "a\\b", "x\0.so"):
        with pytest.raises(BundleError, match="is not a file name in the artifact folder"):
            artifact_file(tmp_path, bad, "module")
