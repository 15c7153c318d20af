"""One way to open a bundle and generate text from it, for every caller: `run`, `generate` (bundles),
`bench` and `serve` on the host, and the server inside a bundle on a device.

open_session() verifies the bundle (checksums, and the signature with `trust`) before anything of it is
loaded, then opens the tokenizer and the engine. Session.generate() is the shared generation loop
(runtime/generate.py) plus what a user of text needs around it: chat or plain prompts, text deltas
as tokens arrive (TextStream), stop strings, and a way to cancel between tokens.

Copied into bundles: imports only the runtime itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bundle_errors import BundleError
from .generate import GenerateResult, generate
from .sampling import Sampler


def open_session(bundle, max_length: int | None = None, trust=None, device: str | None = None) -> "Session":
    """A verified bundle folder, opened: manifest, tokenizer, engine (its KV cache sized for max_length
    tokens). Raises BundleError (exit 2) naming what is wrong."""
    from .hostcheck import check_can_run
    from .manifest_check import verified_copy
    from .tokenizer import Tokenizer, TokenizerError

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle folder")
    # Every file is copied as it is hashed into a private folder, and everything loads from that
    # copy: a bundle changed after the check, or while it runs, cannot swap what was verified.
    manifest, files = verified_copy(bundle, trust)
    check_can_run(manifest)
    try:
        tokenizer = Tokenizer.load(files / "tokenizer")
    except TokenizerError as err:
        raise BundleError(str(err)) from None
    session = Session(bundle, manifest, tokenizer, None, max_length, device, files=files)
    session.engine = session.open_engine()
    return session


@dataclass
class Completion:
    """One answer: generated ids (a stop id included), its text (stop strings cut off), why it ended
    ("stop": an end token or a stop string, "length": max_tokens or the context, "cancelled")."""

    ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    result: GenerateResult | None  # timings; None when cancelled before the first token

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV positions an earlier prompt computed (reuse_prefix)."""
        return self.result.cached_tokens if self.result is not None else 0


class Session:
    """A verified, opened bundle. One engine is one sequence at a time: a server opens more with
    sibling(), which share the verified manifest and the tokenizer (thread-safe) but not a KV cache."""

    def __init__(self, bundle: Path, manifest: dict, tokenizer, engine, max_length=None, device=None, files=None):
        # bundle: the folder the user named (the model's name); files: the verified private copy
        # that everything loads from (the bundle itself where nothing was copied)
        self.bundle, self.manifest, self.tokenizer, self.engine = Path(bundle), manifest, tokenizer, engine
        self.files = Path(files) if files is not None else self.bundle
        self._max_length, self._device = max_length, device

    def open_engine(self):
        from .smoke import open_bundle_engine

        return open_bundle_engine(self.files, self.manifest, device=self._device, max_length=self._max_length)

    def sibling(self) -> "Session":
        """Another engine on the same bundle (its own KV cache), opened without verifying again. An engine
        that can share its loaded model (ONNX: one session runs concurrent calls) does so."""
        twin = getattr(self.engine, "sibling", None)
        engine = twin() if twin is not None else self.open_engine()
        return Session(self.bundle, self.manifest, self.tokenizer, engine, self._max_length, self._device, self.files)

    def batched(self, n: int, prompt_cache_bytes: int = 0, invariant: bool = False) -> "list[Session] | None":
        """n sessions whose engines decode together, one call a step for all active sequences
        (runtime/onnx_batch.py), where this engine's graph allows it; None where it does not. With
        prompt_cache_bytes, finished prompts' KV positions are kept (up to 2n of them, that many bytes) for
        the requests that begin alike (generate's reuse_prefix). `invariant`: no answer depends on the
        traffic (BatchDecoder's invariant)."""
        from .onnx_batch import BatchDecoder, can_batch
        from .prefix import PromptCache

        if not can_batch(self.engine):
            return None
        decoder = BatchDecoder(self.engine, prompt_cache=PromptCache(2 * n, prompt_cache_bytes), invariant=invariant)
        return [Session(self.bundle, self.manifest, self.tokenizer, member, self._max_length, self._device, self.files)
                for member in decoder.members(n)]

    @property
    def context_length(self) -> int | None:
        return getattr(self.engine, "context_length", None)

    @property
    def model_id(self) -> str:
        """The name clients use for this model: the bundle folder's name."""
        return self.bundle.resolve().name

    def encode(self, prompt) -> list[int]:
        """Token ids of a plain prompt (str) or of chat messages (a list of {"role", "content"}) through the
        model's chat template. Message text never becomes special tokens (Tokenizer.encode_chat).
        A chat template that fails (or a model without one) raises BundleError naming it."""
        from .tokenizer import TokenizerError

        try:
            return self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.tokenizer.encode_chat(prompt)
        except TokenizerError as err:
            raise BundleError(str(err)) from None

    def generate(self, prompt_ids, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, stop=(), on_text=None, cancelled=None, reuse_prefix: bool = False) -> Completion:
        """Generate from prompt ids. on_text(delta) gets text as soon as it is final (a character split
        across tokens, or text that may begin a stop string, waits); cancelled() is asked between tokens
        and ends generation when it returns True. reuse_prefix: start from the KV positions of an earlier
        prompt with the same beginning where the engine can (runtime/prefix.py; the same answer, sooner)."""
        stream = TextStream(self.tokenizer, stop)
        state = {"cancelled": False}

        def on_token(token: int) -> bool:
            delta = stream.push(token)
            if delta and on_text is not None:
                on_text(delta)
            if stream.stopped:
                return True
            if cancelled is not None and cancelled():
                state["cancelled"] = True
                return True
            return False

        result = generate(self.engine, prompt_ids, max_tokens, Sampler(temperature, top_p, seed),
                          stop_ids=self.tokenizer.eos_token_ids, on_token=on_token, reuse_prefix=reuse_prefix)
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(tail)
        reason = "cancelled" if state["cancelled"] else result.stopped
        text = stream.text if stream.stopped else self.tokenizer.decode(result.tokens)
        return Completion(result.tokens, text, reason, len(prompt_ids), result)


class TextStream:
    """Tokens in, final text out. The whole answer is decoded each time and the new suffix given out,
    so characters split across byte tokens come out whole; with stop strings, the text is cut before
    the first one and `stopped` set, and text that could still become a stop string is held back."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    @property
    def text(self) -> str:
        return self.shown

    def push(self, token: int) -> str:
        """The text that became final with this token ("" when none did)."""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""  # an incomplete UTF-8 sequence, or the decoder revised earlier text: wait
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._show(text[:cut])
        return self._show(text[: len(text) - self._held_back(text)])

    def finish(self) -> str:
        """What is left when generation ends (held-back text that did not become a stop string)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        return self._show(text) if text.startswith(self.shown) else ""

    def _show(self, text: str) -> str:
        if len(text) <= len(self.shown):
            return ""
        delta, self.shown = text[len(self.shown):], text
        return delta

    def _first_stop(self, text: str) -> int | None:
        # Search from a little before the shown text: a stop string may straddle old and new text.
        start = max(0, len(self.shown) - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
