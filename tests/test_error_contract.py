"""Issue 21, item 7: one error contract. Bad input is exit 2 with an `error:` line naming it; a bug
in edgeforge is exit 70 (so a test or a script can tell the two apart); no traceback without
--debug on any path, build's per-bundle failure path included; text from the input (paths, model
metadata, generated tokens) never reaches the terminal with its control characters raw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bundle_helpers import cli

ESC = "\x1b"


def test_bug_is_exit_70_without_traceback(monkeypatch, capsys):
    import edgeforge.bundle.doctor as doctor

    def broken():
        return {}["no such key"]  # what a bug looks like: an exception no input explains

    monkeypatch.setattr(doctor, "target_rows", broken)
    code, _, err = cli(capsys, "targets")
    assert code == 70, err
    assert err.startswith("error: internal error (KeyError") and "bug in edgeforge" in err
    assert "Traceback" not in err
    code, _, err = cli(capsys, "targets", "--debug")
    assert code == 70 and "Traceback (most recent call last)" in err


def test_bad_input_stays_exit_2(tmp_path, capsys):
    code, _, err = cli(capsys, "inspect", tmp_path / "nothing-here")
    assert code == 2 and "nothing-here" in err and "internal error" not in err


def test_build_bundle_bug_is_70_and_quiet(tiny_model, tmp_path, monkeypatch, capsys):
    """A backend that crashes inside build's per-bundle step: no traceback (it used to print one
    unconditionally), exit 70 naming the bundle; --debug shows the traceback."""
    import edgeforge.bundle.pack as pack

    def crash(*_args, **_kw):
        raise ZeroDivisionError("simulated backend bug")

    monkeypatch.setattr(pack, "compile_qdir", crash)
    args = ["build", tiny_model("llama32"), "--quant", "q4f32", "--target", "x86-cpu", "--backend", "onnx",
            "--no-quality", "test", "--no-smoke"]
    code, _, err = cli(capsys, *args, "-o", tmp_path / "a")
    assert code == 70, err
    assert "Traceback" not in err and "x86-cpu/onnx" in err and "ZeroDivisionError" in err
    code, _, err = cli(capsys, *args, "-o", tmp_path / "b", "--debug")
    assert code == 70 and "Traceback (most recent call last)" in err


def test_escapes_in_a_path_are_not_printed_raw(tmp_path, capsys):
    evil = tmp_path / f"model{ESC}]0;pwned{chr(7)}{ESC}[2J"
    code, _, err = cli(capsys, "inspect", evil)
    assert code == 2 and ESC not in err and chr(7) not in err and "pwned" in err


def test_escapes_in_model_metadata_are_not_printed_raw(tiny_model, tmp_path, capsys):
    """A model whose config names it with terminal escapes: inspect shows the name, not the escapes."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model("llama32"), model)
    config = json.loads((model / "config.json").read_text())
    config["_name_or_path"] = f"{ESC}[31mred{ESC}]52;c;ZXZpbA=={chr(7)}"
    (model / "config.json").write_text(json.dumps(config))
    code, out, err = cli(capsys, "inspect", model)
    assert code == 0, err
    assert "red" in out and ESC not in out and chr(7) not in out


def test_generated_text_is_shown_without_control_characters(capsys):
    """run's streaming path (Session.generate -> bundle.chat) on a model whose vocabulary holds an
    escape sequence: the terminal never gets it raw."""
    import numpy as np

    from edgeforge.bundle.chat import stream_answer
    from edgeforge.runtime.session import Session

    class Vocab:
        pieces = {1: "hi ", 2: f"{ESC}[2J", 3: "\n\tok"}
        eos_token_ids = ()

        def encode(self, text):
            return [1]

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids)

    class Engine:  # greedy picks 1, 2, 3 in turn
        device = "cpu"

        def reset(self):
            self.n = 0

        def _next(self):
            self.n += 1
            logits = np.zeros(4, np.float32)
            logits[self.n] = 1.0
            return logits

        def prefill(self, ids):
            return self._next()

        def decode(self, token):
            return self._next()

    done = stream_answer(Session(Path("bundle"), {}, Vocab(), Engine()), "hi", max_tokens=3)
    out = capsys.readouterr().out
    assert done.ids == [1, 2, 3]
    assert ESC not in out and out.startswith("hi \ufffd[2J\n\tok")


@pytest.mark.parametrize("args", [["--quant", "nope"], ["--target", f"x{ESC}[1m"]])
def test_usage_errors_are_one_clean_line(tiny_model, tmp_path, capsys, args):
    code, _, err = cli(capsys, "build", tiny_model("llama32"), *args, "-o", tmp_path / "o")
    assert code == 2 and err.startswith("error:") and ESC not in err and "Traceback" not in err


@pytest.mark.parametrize("key,value", [("bos_token_id", 1e308), ("bos_token_id", -1), ("bos_token_id", True),
                                       ("bos_token_id", 10**9), ("eos_token_ids", [2.5]), ("eos_token_ids", 7)])
def test_bundle_tokenizer_ids_outside_the_vocabulary_are_refused(tiny_model, tmp_path, key, value):
    """A re-checksummed bundle whose tokenizer config names an id the vocabulary does not have is
    refused by name when it loads (it used to reach the engine and crash converting to int64)."""
    from edgeforge.model.loader import load_model
    from edgeforge.runtime.tokenizer import Tokenizer, TokenizerError

    load_model(tiny_model("llama32")).tokenizer.save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert Tokenizer.load(tmp_path).bos_token_id == cfg["bos_token_id"]  # intact: loads
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)
