"""Target presets: every shipped file parses, users can add their own, bad files name themselves."""

import json
import subprocess
import sys

import pytest

from edgeforge.errors import EdgeforgeError
from edgeforge.targets import BUILTIN_DIR, get_target, list_targets

REQUIRED = {"x86-cpu", "arm64-linux", "rpi4", "rpi5", "jetson-orin", "cuda", "metal-macos", "iphone",
            "android-arm64", "vulkan"}


def test_every_required_preset_is_shipped():
    names = {t.name for t in list_targets()}
    assert REQUIRED <= names
    for path in BUILTIN_DIR.glob("*.toml"):
        assert get_target(path.stem).path == path, "file name and target name must agree"


def test_presets_say_what_the_issues_ask():
    assert get_target("rpi5").tvm["host"]["mcpu"] == "cortex-a76"
    assert get_target("rpi4").tvm["host"]["mcpu"] == "cortex-a72"
    assert get_target("cuda").tvm["arches"] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    assert get_target("jetson-orin").tvm["arches"] == ["sm_87"]
    assert get_target("vulkan").onnx["execution_provider"] == "WebGpuExecutionProvider"
    assert get_target("metal-macos").tvm["device"]["kind"] == "metal"
    assert get_target("iphone").tvm["host"]["mtriple"] == "arm64-apple-ios"


def test_auto_backend_and_refusal():
    assert get_target("x86-cpu").pick_backend("auto") == "onnx"  # measured faster on x86 (BENCHMARKS.md)
    assert get_target("cuda").pick_backend("auto") == "tvm"
    with pytest.raises(EdgeforgeError, match="vulkan.*--backend tvm"):
        get_target("vulkan").pick_backend("tvm")


def test_cpu_presets_say_why_auto_picks_onnx():
    """Issue 24: which backend to use on CPUs, and why, is stated where users look (`edgeforge targets`)."""
    from edgeforge.bundle.doctor import target_row

    for name in ("x86-cpu", "rpi4", "rpi5", "arm64-linux"):
        row = target_row(get_target(name))
        assert row["auto_backend"] == "onnx" and "faster" in row["auto_why"] and "BENCHMARKS.md" in row["auto_why"]


def test_user_target_from_env_dir(tmp_path, monkeypatch):
    (tmp_path / "my-board.toml").write_text(
        'name = "my-board"\nbackends = ["onnx"]\nrun = "qemu"\nos = "linux"\narch = "aarch64"\n'
        '[onnx]\nexecution_provider = "CPUExecutionProvider"\naccuracy_level = 4\n'
    )
    monkeypatch.setenv("EDGEFORGE_TARGETS", str(tmp_path))
    assert get_target("my-board").onnx["accuracy_level"] == 4
    assert "my-board" in {t.name for t in list_targets()}


@pytest.mark.parametrize("body,message", [
    ('name = "b"\nbackends = ["tvm"]\nrun = "host"\nos = "linux"\narch = "x86_64"\n', "no \\[tvm\\] host"),
    ('name = "b"\nbackends = ["cuda"]\nrun = "host"\nos = "linux"\narch = "x86_64"\n', "backends must be"),
    ('name = "b"\nbackends = ["onnx"]\nos = "linux"\narch = "x86_64"\n', "missing key 'run'"),
    ('name = "b"\nbackends = [onnx\n', "bad.toml"),
    # typos are refused by name, never ignored (the preset would silently lose the setting)
    ('name = "b"\nbackends = ["onnx"]\nrun = "host"\nos = "linux"\narch = "x86_64"\ndescripton = "x"\n'
     '[onnx]\nexecution_provider = "CPUExecutionProvider"\n', "unknown key\\(s\\) 'descripton'"),
    ('name = "b"\nbackends = ["onnx"]\nrun = "host"\nos = "linux"\narch = "x86_64"\n'
     '[onnx]\nexecution_provider = "CPUExecutionProvider"\n[tvn]\nhost = "llvm"\n', "unknown key\\(s\\) 'tvn'"),
    ('name = "b"\nbackends = ["onnx"]\nbackend_why = 3\nrun = "host"\nos = "linux"\narch = "x86_64"\n'
     '[onnx]\nexecution_provider = "CPUExecutionProvider"\n', "'backend_why' must be a string"),
    # the core goes on qemu's command line (smoke --emulate): a plain core name only
    ('name = "b"\nbackends = ["onnx"]\nrun = "qemu"\nos = "linux"\narch = "aarch64"\ncpu = "cortex-a72 -d in_asm"\n'
     '[onnx]\nexecution_provider = "CPUExecutionProvider"\n', "cpu 'cortex-a72 -d in_asm' must be a CPU core name"),
    ('name = "b"\nbackends = ["onnx"]\nrun = "qemu"\nos = "linux"\narch = "aarch64"\ncpu = 72\n'
     '[onnx]\nexecution_provider = "CPUExecutionProvider"\n', "'cpu' must be a string"),
])
def test_bad_target_file_names_itself(tmp_path, monkeypatch, body, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(body)
    with pytest.raises(EdgeforgeError, match=message) as err:
        get_target(str(bad))
    assert str(bad) in str(err.value)


def test_unknown_target_lists_known_ones():
    with pytest.raises(EdgeforgeError, match="unknown target 'nope'.*rpi5"):
        get_target("nope")


def test_cli_exit_code_2_for_unknown_target(tmp_path):
    qdir = tmp_path / "q"
    qdir.mkdir()
    (qdir / "quantization.json").write_text(json.dumps({}))
    proc = subprocess.run([sys.executable, "-m", "edgeforge.cli", "compile", str(qdir), "--target", "nope",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown target 'nope'" in proc.stderr
    assert not (tmp_path / "out").exists()
