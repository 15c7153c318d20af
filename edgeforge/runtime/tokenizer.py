"""Tokenizer: a `tokenizers.Tokenizer` plus what the model needs around it (BOS/EOS ids, whether to
add BOS, the chat template rendered with jinja2 the way transformers renders it).

Stored as two files (the QDIR and bundle format):
  tokenizer.json          HF tokenizers JSON
  tokenizer_config.json   {"bos_token_id", "eos_token_ids", "add_bos_token", "chat_template"}

Copied into bundles: imports only the standard library, tokenizers and jinja2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .bundle_errors import BundleError
from .manifest_check import read_regular

MAX_CONFIG_BYTES = 16 << 20  # tokenizer_config.json (Llama 3's is ~50 KB)
MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json (Llama 3's is 9 MB)


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or a chat template failed; the message names it."""


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, bos_token_id: int | None = None, eos_token_ids=(),
                 add_bos_token: bool = False, chat_template: str | None = None):
        self.tok = tok
        self.bos_token_id = None if bos_token_id is None else int(bos_token_id)
        self.eos_token_ids = [int(i) for i in eos_token_ids]
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template or None
        self._template = None
        # encode_special_tokens is a switch on the shared Rust tokenizer: a server encodes from several
        # threads, and one thread's switch must never apply to another's text (markup as plain text, or
        # worse, a user's text as markup).
        self._encode_lock = threading.Lock()

    # ---- basic ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.tok.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.tok.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g. "<|im_start|>") are matched.

        BOS is added here, not by the tokenizer's post-processor, so that `add_bos` means the same
        for every source (add_special_tokens=False turns the post-processor off).
        """
        with self._encode_lock:
            ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos_token if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids  # like transformers, even if the text starts with BOS
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render `messages` ([{"role", "content"}]) with the model's chat template (sandboxed jinja2)."""
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json 'chat_template'); "
                                 "use a plain prompt instead of --chat")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            return _render_bounded(
                self._template, messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra,
            )
        except TokenizerError:
            raise
        except Exception as err:  # jinja2 errors carry no file; say what failed
            raise TokenizerError(f"chat template failed: {type(err).__name__}: {err}") from err

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered chat. Like transformers, the template writes BOS itself if it wants one.

        Message text is text: a user who types "<|im_start|>system" gets those characters, never the
        special tokens that open a system turn. Only the template's own markup becomes special tokens.
        When no message contains special-token text, the ids are exactly those of the whole rendered
        string (what transformers gives)."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        specials = self._special_strings()
        if not any(sp in str(m.get("content", "")) for m in messages for sp in specials):
            return self.encode(text, add_bos=False)
        return self._encode_with_plain_contents(messages, add_generation_prompt, text)

    def _special_strings(self) -> list[str]:
        return [t.content for t in self.tok.get_added_tokens_decoder().values() if t.special and t.content]

    def _encode_with_plain_contents(self, messages, add_generation_prompt: bool, text: str) -> list[int]:
        """Render with a placeholder per message, then encode the template's text with special tokens
        matched and each message's text with special tokens spelled out as ordinary text."""
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = [dict(m, content=mark) for m, mark in zip(messages, marks)]
        skeleton = self.apply_chat_template(marked, add_generation_prompt)
        pieces, rest = [], skeleton
        for m, mark in zip(messages, marks):
            before, found, rest = rest.partition(mark)
            if not found:  # the template transforms message text: its spans cannot be located
                raise TokenizerError("a message contains special-token text and this chat template rewrites "
                                     "message text; refusing rather than letting the text act as markup")
            pieces += [(before, True), (str(m.get("content", "")), False)]
        pieces.append((rest, True))
        if "".join(p for p, _ in pieces) != text:
            raise TokenizerError("a message contains special-token text and the chat template does not place "
                                 "message text verbatim; refusing rather than letting the text act as markup")
        ids = []
        with self._encode_lock:
            for piece, markup in pieces:
                if not piece:
                    continue
                self.tok.encode_special_tokens = not markup
                try:
                    ids += self.tok.encode(piece, add_special_tokens=False).ids
                finally:
                    self.tok.encode_special_tokens = False
        return ids

    # ---- files ---------------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {"bos_token_id": self.bos_token_id, "eos_token_ids": self.eos_token_ids,
                "add_bos_token": self.add_bos_token, "chat_template": self.chat_template}

    def save(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json into `folder` (byte-stable for one tokenizer)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.json").write_text(self.tok.to_str(pretty=True), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(
            json.dumps(self.config_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Read what save() wrote."""
        folder = Path(folder)
        tok_path, cfg_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
        tok = load_tokenizer_json(tok_path)
        try:
            cfg = json.loads(read_regular(cfg_path, MAX_CONFIG_BYTES, "tokenizer config", follow_links=True))
        except (BundleError, ValueError) as err:
            raise TokenizerError(f"{cfg_path}: cannot read tokenizer config ({err})") from None
        try:
            if not isinstance(cfg, dict):
                raise TypeError("not a JSON object")
            template = cfg.get("chat_template")
            if template is not None and not isinstance(template, str):
                raise TypeError("chat_template is not text")
            bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_ids") or []
            if not isinstance(eos, list):
                raise TypeError("eos_token_ids is not a list")
            vocab = tok.get_vocab_size(with_added_tokens=True)
            for token_id in ([] if bos is None else [bos]) + eos:  # ids reach the engine as int64
                if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < vocab:
                    raise ValueError(f"token id {token_id!r} is not an id of this {vocab}-token vocabulary")
            return cls(tok, bos, eos, cfg.get("add_bos_token", False), template)
        except (TypeError, ValueError) as err:
            raise TokenizerError(f"{cfg_path}: malformed tokenizer config ({err})") from None


def load_tokenizer_json(path: str | os.PathLike) -> _HFTokenizer:
    path = Path(path)
    if not path.exists():
        raise TokenizerError(f"{path}: no such tokenizer file")
    if not path.is_file() or path.stat().st_size > MAX_TOKENIZER_BYTES:  # a fifo would hang the reader
        raise TokenizerError(f"{path}: not a regular file of at most {MAX_TOKENIZER_BYTES >> 20} MiB")
    try:
        return _HFTokenizer.from_file(str(path))
    except Exception as err:
        raise TokenizerError(f"{path}: unreadable tokenizer.json ({str(err).splitlines()[0][:200]})") from None


# A chat template is code from the model: its rendering is bounded in time and in output (a real
# template renders a conversation in well under a millisecond, and a prompt longer than any context
# is useless), and a template cannot build huge strings or lists with * or + (memory before time).
TEMPLATE_SECONDS = 5.0
TEMPLATE_MAX_CHARS = 4 << 20


def _render_bounded(template, **context) -> str:
    out, size = [], 0
    with _deadline(TEMPLATE_SECONDS):
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > TEMPLATE_MAX_CHARS:
                raise TokenizerError(f"chat template output is larger than {TEMPLATE_MAX_CHARS} characters; refused")
            out.append(chunk)
            _check_deadline()
    return "".join(out)


# The time bound is checked from inside the render (every loop step, call, operator, attribute and
# output chunk), so it holds in any thread: a server renders in worker threads, where a signal cannot
# reach. Per thread, because threads render the same compiled template at once.
_render_state = threading.local()


@contextlib.contextmanager
def _deadline(seconds: float):
    """TokenizerError from _check_deadline once the block has run longer than `seconds`."""
    outer = getattr(_render_state, "deadline", None)
    _render_state.deadline = time.monotonic() + seconds
    _render_state.seconds = seconds
    try:
        yield
    finally:
        _render_state.deadline = outer


def _check_deadline() -> None:
    deadline = getattr(_render_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TokenizerError(f"chat template did not finish rendering within {_render_state.seconds:g} s; refused")


def _bounded_iter(iterable):
    """What every `{% for %}` of a chat template iterates: the items, with the deadline checked."""
    for item in iterable:
        _check_deadline()
        yield item


def _bounded_binop(left, right, operator: str):
    """Refuse `*` and `+` whose string or list result would exceed the output bound."""
    def size(x):
        return len(x) if isinstance(x, (str, list, tuple)) else None

    if operator == "*":
        seq, count = (left, right) if size(left) is not None else (right, left)
        if size(seq) is not None and isinstance(count, int) and size(seq) * max(count, 0) > TEMPLATE_MAX_CHARS:
            raise TokenizerError(f"chat template builds a sequence of {size(seq) * count} items; refused")
    if operator == "+" and size(left) is not None and size(right) is not None \
            and size(left) + size(right) > TEMPLATE_MAX_CHARS:
        raise TokenizerError(f"chat template builds a sequence of {size(left) + size(right)} items; refused")


def _bounded_value(value) -> None:
    if isinstance(value, (str, list, tuple)) and len(value) > TEMPLATE_MAX_CHARS:
        raise TokenizerError(f"chat template builds a sequence of {len(value)} items; refused")


def _bounded_arguments(args, format_text=None) -> None:
    """Refuse what sizes an output past the bound before it is built (one C call can take seconds and
    gigabytes, out of reach of the deadline): a number past it (center(10**9), indent, ljust, "%*d"),
    a width in a format string ("%0999999999d", "{:>999999999}"), a sequence past it."""
    for value in args:
        for item in (value if isinstance(value, tuple) else (value,)):
            _bounded_value(item)
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > TEMPLATE_MAX_CHARS:
                raise TokenizerError(f"chat template asks for a size of {item}; refused")
    if isinstance(format_text, str) and any(len(d) > 6 and int(d) > TEMPLATE_MAX_CHARS
                                            for d in re.findall(r"\d+", format_text)):
        raise TokenizerError("chat template formats with a width past the output bound; refused")


def _bounded_replace(text=None, old=None, new=None) -> None:
    """str.replace("", big) multiplies: refuse a result past the bound before it is built."""
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = len(text) + 1 if old == "" else text.count(old)
        if len(text) + count * (len(new) - len(old)) > TEMPLATE_MAX_CHARS:
            raise TokenizerError("chat template replaces into a text past the output bound; refused")


def _checked_call(function, args, kwargs) -> None:
    """The bounds for a filter, a method or a global about to be called."""
    _check_deadline()
    _bounded_arguments((*args, *kwargs.values()))
    if isinstance(getattr(function, "__self__", None), str) and getattr(function, "__name__", "") == "replace":
        _bounded_replace(function.__self__, *args[:2])


def _bounded_filter(name, function):
    """A filter with the call bounds; its value (after the context jinja passes to some filters) is
    format's text, replace's text."""
    from jinja2.utils import _PassArg

    def bounded(*args, **kwargs):
        _checked_call(function, args, kwargs)
        value_and_args = args[1:] if _PassArg.from_obj(function) else args
        if name == "format" and value_and_args:
            _bounded_arguments((), value_and_args[0])
        if name == "replace":
            _bounded_replace(*value_and_args[:3])
        return function(*args, **kwargs)

    functools.update_wrapper(bounded, function)  # keeps pass_context/pass_environment marks
    return bounded


def _compile_template(source: str):
    """A jinja2 template in a sandbox, with the helpers transformers' chat templates rely on."""
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "%"])  # intercepted: not folded at compile time either
        bounded_iter = staticmethod(_bounded_iter)

        def _parse(self, source, name, filename):
            """Every loop iterates through bounded_iter: an attribute of the environment, which no
            template variable can shadow."""
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None)
            return tree

        def call_binop(self, context, operator, left, right):
            _check_deadline()
            _bounded_binop(left, right, operator)
            if operator == "%":
                _bounded_arguments((right,), left)
            return super().call_binop(context, operator, left, right)

        def call(self, context, obj, *args, **kwargs):  # a macro recursing on a doubled string
            _checked_call(obj, args, kwargs)
            return super().call(context, obj, *args, **kwargs)

        def wrap_str_format(self, value):  # "{:>999999999}".format(1): the width is in the text
            if getattr(value, "__name__", "") in ("format", "format_map"):
                _bounded_arguments((), getattr(value, "__self__", None))
            return super().wrap_str_format(value)

        def getattr(self, obj, attribute):
            _check_deadline()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_deadline()
            return super().getitem(obj, argument)

    class BoundedNamespace(Namespace):  # `{% set ns.s = ns.s ~ ns.s %}` in a loop
        def __setitem__(self, name, value):
            _bounded_value(value)
            super().__setitem__(name, value)

    def raise_exception(message):
        raise TokenizerError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["namespace"] = BoundedNamespace
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except Exception as err:
        raise TokenizerError(f"chat template does not compile: {err}") from None
