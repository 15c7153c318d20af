"""`edgeforge run`: stream one answer, or an interactive chat loop on a terminal."""

from __future__ import annotations

import logging

import click

from ..runtime.smoke import terminal_text

logger = logging.getLogger(__name__)


def echo_model_text(text: str) -> None:
    """Model text to the terminal: its control characters (terminal escapes) never printed raw."""
    click.echo(terminal_text(text), nl=False)


def answer_json(session, prompt: str, chat: bool, max_tokens=128, temperature=0.0, top_p=1.0, seed=0) -> dict:
    """One answer as a dict (prompt ids, tokens, text, timings): what --json prints."""
    ids = session.encode([{"role": "user", "content": prompt}] if chat else prompt)
    done = session.generate(ids, max_tokens, temperature, top_p, seed)
    return {"prompt_ids": list(ids), "tokens": done.ids, "text": done.text, "stopped": done.result.stopped,
            "device": getattr(session.engine, "device", "?"), **done.result.timings()}


def stream_answer(session, prompt, max_tokens=128, temperature=0.0, top_p=1.0, seed=0, reuse_prefix=False):
    """prompt: a string (plain) or a list of chat messages. Prints the answer as it comes; returns it
    (a session.Completion)."""
    done = session.generate(session.encode(prompt), max_tokens, temperature, top_p, seed, on_text=echo_model_text,
                            reuse_prefix=reuse_prefix)
    click.echo()
    result = done.result
    cached = f", {result.cached_tokens} prompt tokens reused" if result.cached_tokens else ""
    logger.info(f"[{len(done.ids)} tokens, prefill {result.prefill_tokens_per_second:.1f} tok/s{cached}, "
                f"decode {result.decode_tokens_per_second:.1f} tok/s]")
    return done


def chat_loop(session, **opts) -> None:
    """Multi-turn chat: the whole conversation is encoded each turn; the engine keeps the positions the
    last turn's prompt computed, so a turn prefills the last answer and the new line (runtime/prefix.py)."""
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
        answer = stream_answer(session, messages, **opts, reuse_prefix=True)
        messages.append({"role": "assistant", "content": answer.text})
