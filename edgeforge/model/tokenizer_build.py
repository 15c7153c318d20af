"""Build an HF `tokenizers` JSON for sources that have none: a sentencepiece tokenizer.model, or the
vocabulary stored in GGUF metadata (tokenizer.ggml.*).

Two families, matching what transformers builds for the same inputs (so ids agree):
- sentencepiece BPE (Llama 1/2, GGUF "llama"): BPE over "▁"-spelled pieces with byte fallback;
  merges recovered from the vocabulary, best score first; Metaspace pre-tokenizer that prepends
  "▁" to the first word only (transformers' non-legacy Llama behaviour).
- byte-level BPE (GPT-2 / Llama 3 / SmolLM, GGUF "gpt2"): vocabulary and merges as stored;
  GPT-2 pre-tokenizer regex, or Llama 3's split regex when tokenizer.ggml.pre says so.
"""

from __future__ import annotations

import struct
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import EdgeforgeError
from ..runtime.manifest_check import read_regular

# GGUF / sentencepiece piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Split regex of Llama 3's tokenizer (tiktoken cl100k style); GGUF tokenizer.ggml.pre values using it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"}


# ---- sentencepiece --------------------------------------------------------------------------------
def sentencepiece_bpe(tokens: list[str], scores: list[float], types: list[int], unk_id: int | None,
                      add_prefix_space: bool = True, byte_fallback: bool = True) -> HFTokenizer:
    """A tokenizers BPE equivalent to a sentencepiece BPE model with byte fallback."""
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = tokens[unk_id] if unk_id is not None else None
    model = models.BPE(vocab=vocab, merges=_merges_from_scores(tokens, scores, types), unk_token=unk,
                       fuse_unk=True, byte_fallback=byte_fallback, dropout=None)
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    _add_typed_tokens(tok, tokens, types, byte_level=False)
    return tok


def _merges_from_scores(tokens, scores, types) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges the adjacent pair whose concatenation scores highest. As tokenizers
    merges: every (left, right) split of every normal piece into two known pieces, best merged
    score first; ties (splits of one piece) by longer left piece, then ids, as transformers does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, ty in zip(tokens, types) if ty in (NORMAL, USER_DEFINED)}
    found = []
    for piece, ty in zip(tokens, types):
        if ty != NORMAL or len(piece) < 2:
            continue
        score = scores[vocab[piece]]
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in mergeable and piece[k:] in mergeable]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found += [(score, len(l), len(r), l, r) for l, r in local]
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)  # stable: ties keep the id order above
    return [(l, r) for _, _, _, l, r in found]


def read_sentencepiece_model(path: Path) -> dict:
    """Parse a sentencepiece ModelProto (tokenizer.model) without protobuf: pieces with score and
    type, the model type and add_dummy_prefix. Only the few fields we need are decoded."""
    try:
        data = read_regular(Path(path), 256 << 20, "sentencepiece model", follow_links=True)
        fields = _proto_fields(data)
        pieces = []
        for f, v in fields:
            if f == 1:  # repeated SentencePiece {1: piece, 2: score (float), 3: type (enum, default NORMAL)}
                p = dict(_proto_fields(v))
                pieces.append((p[1].decode("utf-8"), p.get(2, 0.0), p.get(3, NORMAL)))
        trainer = dict(_proto_fields(next((v for f, v in fields if f == 2), b"")))
        normalizer = dict(_proto_fields(next((v for f, v in fields if f == 3), b"")))
    except (ValueError, KeyError, UnicodeDecodeError, IndexError, struct.error) as err:
        raise EdgeforgeError(f"{path}: not a sentencepiece model ({err})") from None
    if not pieces:
        raise EdgeforgeError(f"{path}: not a sentencepiece model (no pieces)")
    return {
        "tokens": [p[0] for p in pieces], "scores": [p[1] for p in pieces], "types": [p[2] for p in pieces],
        "model_type": trainer.get(3, 1),  # 1 UNIGRAM (proto default), 2 BPE
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "byte_fallback": bool(trainer.get(35, 0)),
    }


def _proto_fields(data: bytes):
    """(field number, value) pairs of one protobuf message: varints as int, 32-bit as float,
    length-delimited as bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 5:
            value, i = struct.unpack_from("<f", data, i)[0], i + 4
        elif wire == 1:
            value, i = struct.unpack_from("<d", data, i)[0], i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated message")
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((field, value))
    return out


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def from_sentencepiece_file(path: Path) -> tuple[HFTokenizer, dict]:
    """(tokenizer, {"bos_token_id", "eos_token_id", "unk_token_id"}) from a tokenizer.model."""
    sp = read_sentencepiece_model(path)
    if sp["model_type"] != 2:
        raise EdgeforgeError(f"{path}: only sentencepiece BPE models are supported (this one is "
                             f"{ {1: 'unigram', 3: 'word', 4: 'char'}.get(sp['model_type'], sp['model_type']) })")
    types = sp["types"]
    ids = {}
    for name, piece in (("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        ids[name] = next((i for i, (t, ty) in enumerate(zip(sp["tokens"], types)) if t == piece and ty == CONTROL), None)
    ids["unk_token_id"] = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    tok = sentencepiece_bpe(sp["tokens"], sp["scores"], types, ids["unk_token_id"], sp["add_dummy_prefix"],
                            sp["byte_fallback"] or BYTE in types)
    return tok, ids


# ---- byte-level BPE --------------------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_bpe(tokens: list[str], merges: list[str], types: list[int], pre: str | None) -> HFTokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens the file wrote in plain text (some converters do that for specials) are respelled.
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")), i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    if pre in LLAMA3_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:  # what transformers does for every other pre-tokenizer name: GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    _add_typed_tokens(tok, tokens, types, byte_level=True)
    return tok


def _add_typed_tokens(tok: HFTokenizer, tokens, types, byte_level: bool) -> None:
    """Control (and unknown) tokens become special added tokens, user-defined ones plain added
    tokens, so that text containing them is matched whole instead of being split into pieces."""
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (CONTROL, UNKNOWN) and (alphabet is None or set(t) <= alphabet)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


# ---- GGUF ------------------------------------------------------------------------------------------
def from_gguf_metadata(meta: dict, source: str) -> tuple[HFTokenizer, dict]:
    """(tokenizer, {"bos_token_id", "eos_token_ids", "add_bos_token", "chat_template"}) from GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise EdgeforgeError(f"{source}: GGUF has no tokenizer (tokenizer.ggml.tokens missing)")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "llama":
        scores = list(meta.get("tokenizer.ggml.scores") or [-float(i) for i in range(len(tokens))])
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = sentencepiece_bpe(tokens, scores, types, None if unk is None else int(unk),
                                bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True  # llama.cpp adds BOS for sentencepiece vocabularies unless told otherwise
    elif kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise EdgeforgeError(f"{source}: byte-level BPE tokenizer without tokenizer.ggml.merges")
        tok = byte_level_bpe(tokens, list(merges), types, meta.get("tokenizer.ggml.pre"))
        add_bos_default = False
    else:
        raise EdgeforgeError(f"{source}: unsupported tokenizer.ggml.model '{kind}' (supported: llama, gpt2)")
    eos = [meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return tok, {
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_ids": list(dict.fromkeys(int(e) for e in eos if e is not None)),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
