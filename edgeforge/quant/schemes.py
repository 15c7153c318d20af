"""Quantization schemes: which storage format each tensor of a Llama model gets.

| scheme | linear weights | scale dtype | model dtype |
|--------|----------------|-------------|-------------|
| q0f32  | f32            | -           | float32     |
| q0f16  | f16            | -           | float16     |
| q8f16  | q8             | float16     | float16     |
| q4f16  | q4             | float16     | float16     |
| q4f32  | q4             | float32     | float32     |

Norm weights (and any other 1-D tensor) are always f32. Embeddings and lm_head use the linear
format unless embed_bits=8, which stores them as q8 with the scheme's scale dtype (its model dtype
for the q0 schemes): the embedding is the biggest tensor of small models and the most sensitive one.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgeforgeError
from .formats import get_format

EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
EMBED_BITS_CHOICES = (8,)


@dataclass(frozen=True)
class Scheme:
    name: str
    linear: str  # storage format of 2-D weights: f32 | f16 | q8 | q4
    scale_dtype: str | None  # of q8/q4 scales; None for f32/f16
    model_dtype: str  # what backends compute in

    def embed_format(self, embed_bits: int | None = None) -> str:
        check_embed_bits(embed_bits)
        return "q8" if embed_bits == 8 else self.linear

    def format_name(self, tensor: str, shape, embed_bits: int | None = None) -> str:
        """The storage format name of one tensor under this scheme."""
        if len(shape) != 2:
            return "f32"  # norms: tiny and precision-critical
        if tensor in EMBED_NAMES:
            return self.embed_format(embed_bits)
        return self.linear

    def format_for(self, tensor: str, shape, embed_bits: int | None = None):
        """The format object (with its scale dtype) that stores `tensor` under this scheme."""
        fmt = self.format_name(tensor, shape, embed_bits)
        scale = self.scale_dtype or self.model_dtype
        return get_format(fmt, scale if fmt in ("q8", "q4") else None)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("q0f32", "f32", None, "float32"),
        Scheme("q0f16", "f16", None, "float16"),
        Scheme("q8f16", "q8", "float16", "float16"),
        Scheme("q4f16", "q4", "float16", "float16"),
        Scheme("q4f32", "q4", "float32", "float32"),
    ]
}


def get_scheme(name: str) -> Scheme:
    if isinstance(name, Scheme):
        return name
    try:
        return SCHEMES[name]
    except KeyError:
        raise EdgeforgeError(f"unknown quantization scheme '{name}' (known: {', '.join(SCHEMES)})") from None


def check_embed_bits(embed_bits) -> None:
    if embed_bits is not None and embed_bits not in EMBED_BITS_CHOICES:
        raise EdgeforgeError(f"--embed-bits {embed_bits}: only 8 is supported (or leave it out)")
