"""One registry per concept, asked by every layer: backends (runtime/backends.py) and schemes
(quant/schemes.py). Each layer's view is checked against the registry, and the registry's derived
numbers against arithmetic done here by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from bundle_helpers import cli
from edgeforge.errors import EdgeforgeError
from edgeforge.quant.schemes import SCHEMES, bits_per_weight
from edgeforge.runtime.backends import BACKENDS
from edgeforge.targets import list_targets, load_target_file

PACKAGE = Path(__file__).resolve().parent.parent / "edgeforge"


@pytest.fixture
def edgeforge_help(capsys):
    def run(*command) -> str:
        code, out, err = cli(capsys, *command, "--help")
        assert code == 0, err
        return out

    return run


@pytest.mark.parametrize("fmt, scale, bits", [
    ("q4", "float16", 4 + 16 / 32),             # a nibble, one fp16 scale a group of 32
    ("q4", "float32", 4 + 32 / 32),
    ("q4a", "float16", 4 + 16 / 32 + 4 / 32),   # + a 4-bit zero point a group
    ("q8", "float16", 8 + 16 / 32),
    ("q8", "float32", 8 + 32 / 32),
    ("f16", None, 16), ("f32", None, 32),
])
def test_bits_per_weight_from_the_stored_layout(fmt, scale, bits):
    assert bits_per_weight(fmt, scale) == bits


def test_quantize_help_lists_every_registered_scheme_with_its_bits(edgeforge_help):
    text = edgeforge_help("quantize")
    table = text[text.index("Schemes ("):].splitlines()[1:]
    rows = {line.split()[0]: line.split()[1:] for line in table if line.split() and line.split()[0] in SCHEMES}
    assert set(rows) == set(SCHEMES)
    assert rows["q4f16_m"][:3] == ["4.625", "/", "8.5"] and rows["q4f16_rtn"][0] == "4.5"
    assert rows["q0f32"][0] == "32" and rows["q8f16"][0] == "8.5"
    assert " ".join(SCHEMES) in " ".join(edgeforge_help("build").split())  # build --quant names them too


def test_backend_choices_of_every_command_are_the_registry(edgeforge_help):
    for command, extra in (("compile", ["auto"]), ("build", ["auto", "all"])):
        text = " ".join(edgeforge_help(command).split())
        assert f"--backend [{'|'.join(extra + list(BACKENDS))}]" in text, command


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_each_backend_has_its_compiler_and_engine_modules(name):
    """Read from the sources: importing a compile module loads its compiler (tvm: seconds), and the
    TVM engine needs tvm_ffi, which the compiler side does not."""
    entry = BACKENDS[name]
    compile_source = PACKAGE.parent / (entry.compile_module.replace(".", "/") + ".py")
    assert "\ndef compile_model(qdir" in compile_source.read_text()
    engine_source = PACKAGE / "runtime" / (entry.engine_module.lstrip(".") + ".py")
    assert "\ndef open_engine(artifact_dir, weights_dir" in engine_source.read_text()


def test_every_target_lists_registered_backends_only():
    for target in list_targets():
        assert set(target.backends) <= set(BACKENDS), target.name


def test_a_target_file_is_checked_against_the_registry(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text('name = "t"\nbackends = ["tflite"]\nrun = "host"\nos = "linux"\narch = "x86_64"\n')
    with pytest.raises(EdgeforgeError, match=r"backends must be a non-empty list of \('tvm', 'onnx'\)"):
        load_target_file(path)
    path.write_text('name = "t"\nbackends = ["onnx"]\nrun = "host"\nos = "linux"\narch = "x86_64"\n[onnx]\n')
    with pytest.raises(EdgeforgeError, match=r"lists backend onnx but has no \[onnx\] execution_provider"):
        load_target_file(path)
