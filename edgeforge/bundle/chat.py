"""`edgeforge run`: stream one answer, or an interactive chat loop on a terminal."""

from __future__ import annotations

import logging

import click

from ..runtime.generate import generate
from ..runtime.sampling import Sampler
from ..runtime.smoke import terminal_text

logger = logging.getLogger(__name__)


class Streamer:
    """Print text as tokens arrive: decode the whole answer each time and print the new suffix,
    so multi-token characters (UTF-8 split across byte tokens) and sentencepiece spaces come out
    right. The text comes from the model's vocabulary: control characters (terminal escapes) are
    never printed raw (terminal_text)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):  # incomplete UTF-8: wait
            return
        click.echo(terminal_text(text[len(self.shown):]), nl=False)
        self.shown = text

    def finish(self) -> None:
        """The rest of the text (a last incomplete character) and a newline."""
        text = self.tokenizer.decode(self.ids)
        click.echo(terminal_text(text[len(self.shown):]) if text.startswith(self.shown) else "")


def answer_json(engine, tokenizer, prompt: str, chat: bool, max_tokens=128, temperature=0.0, top_p=1.0, seed=0) -> dict:
    """One answer as a dict (prompt ids, tokens, text, timings): what --json prints."""
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else tokenizer.encode(prompt)
    result = generate(engine, ids, max_tokens, Sampler(temperature, top_p, seed), stop_ids=tokenizer.eos_token_ids)
    return {"prompt_ids": list(ids), "tokens": result.tokens, "text": tokenizer.decode(result.tokens),
            "stopped": result.stopped, "device": getattr(engine, "device", "?"), **result.timings()}


def stream_answer(engine, tokenizer, prompt, max_tokens=128, temperature=0.0, top_p=1.0, seed=0) -> list[int]:
    """prompt: a string (plain) or a list of chat messages. Returns the generated ids."""
    ids = tokenizer.encode_chat(prompt) if isinstance(prompt, list) else tokenizer.encode(prompt)
    streamer = Streamer(tokenizer)
    result = generate(engine, ids, max_tokens, Sampler(temperature, top_p, seed),
                      stop_ids=tokenizer.eos_token_ids, on_token=streamer)
    streamer.finish()
    logger.info(f"[{len(result.tokens)} tokens, prefill {result.prefill_tokens_per_second:.1f} tok/s, "
                f"decode {result.decode_tokens_per_second:.1f} tok/s]")
    return result.tokens


def chat_loop(engine, tokenizer, **opts) -> None:
    """Multi-turn chat: the whole conversation is re-encoded each turn (simple; the cache is reset)."""
    messages = []
    click.echo("chat with the bundle; an empty line or Ctrl-D ends it", err=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        tokens = stream_answer(engine, tokenizer, messages, **opts)
        messages.append({"role": "assistant", "content": tokenizer.decode(tokens)})
