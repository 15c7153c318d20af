"""Quantization schemes: which storage format each tensor of a Llama model gets.

| scheme    | 2-D weights                          | q8 instead of q4 for             | bits/weight* |
|-----------|--------------------------------------|----------------------------------|-------------:|
| q0f32     | f32                                  | -                                | 32           |
| q0f16     | f16                                  | -                                | 16           |
| q8f16     | q8 (fp16 scales)                     | -                                | 8.5          |
| q4f16     | q4, calibrated scale search          | embedding/lm_head, attn v        | 4.5 (+)      |
| q4f32     | as q4f16, fp32 scales, fp32 compute  | embedding/lm_head, attn v        | 5.0 (+)      |
| q4f16_m   | q4a (asymmetric: a zero point a group), GPTQ with the (scale, zero) search | + attn k; ffn down in llama.cpp's more-bits layers, ffn up in the first and last eighth | 4.625 (++) |
| q4f16_rtn | q4, round to nearest (the old q4f16) | -                                | 4.5          |
| q4f32_rtn | as q4f16_rtn, fp32 scales            | -                                | 5.0          |

*Per q4 or q8 weight, scales counted: q4 with fp16 scales is 4 + 16/32 = 4.5, q4a adds a 4-bit
zero point a group (4.625; stored two a byte), q8 is 8.5; what a
whole model comes to depends on its share of embedding and v/down weights (`edgeforge quantize`
prints it; BENCHMARKS.md has a column). Norm weights (and any other 1-D tensor) are always f32.

`embed_bits` (4 or 8) overrides the embedding/lm_head format of any scheme.
The calibrated schemes measure, on the calibration text, how much each input column of each matrix
matters (quant/calibrate.py) and search each group's q4 scale to minimise the error weighted by it
(formats.search_scales; q4a: formats.search_asymmetric); the stored format is the same as round to
nearest. q4a measured on the plausible float SmolLM2 (512 tokens of eval-long): q4f16_m KL 0.0876
symmetric -> 0.0764 asymmetric (+2.5 % size); for q4f16 only 0.111 -> 0.109 (+3 % size), so
q4f16 stays symmetric (docs/notes/quant.md).
q4f16_m goes further (`gptq`): every q4a and q8 matrix of the layers is quantized by GPTQ
(quant/gptq.py) on the whole calibration text, and its q8 budget goes where it measured best under
GPTQ (full eval texts: KL 0.0345 / 0.0428 at 104.35 MB -> 0.0290 / 0.0351 at 103.39 MB with zero
points two a byte, ffn up at the ends instead of attn o in the more-bits layers, and GPTQ on the
whole text; other mixes in docs/notes/quant.md). GPTQ
costs time: a Hessian inverse per matrix, O(in^3) (SmolLM2: ~1 min on 2 cores).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeforgeError
from ..runtime.weights import GROUP, stored_arrays
from .formats import get_format

EMBED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")
EMBED_BITS_CHOICES = (4, 8)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
# q8 roles: the matrices a scheme stores at 8 bits, in every layer, or with ":rule" only in the
# layers a LAYER_RULES rule picks ("ffn_down:more": llama.cpp's _M choice)
ROLE_SUFFIX = {"attn_q": "self_attn.q_proj.weight", "attn_k": "self_attn.k_proj.weight",
               "attn_v": "self_attn.v_proj.weight", "attn_o": "self_attn.o_proj.weight",
               "ffn_gate": "mlp.gate_proj.weight", "ffn_up": "mlp.up_proj.weight", "ffn_down": "mlp.down_proj.weight"}


def more_bits_layer(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits in its _M mixes: the first and last eighth,
    and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def end_layer(i: int, n: int) -> bool:
    """The first and the last eighth of the layers (at least one each): where the model's input and
    output representations are formed, and one matrix there costs the quantized model the most
    (measured: ffn up at 8 bits in layer 0 or 29 of SmolLM2's 30 lowers KL more than attn o in 14)."""
    k = max(1, n // 8)
    return i < k or i >= n - k


LAYER_RULES = {"more": more_bits_layer, "ends": end_layer}


@dataclass(frozen=True)
class Scheme:
    name: str
    linear: str  # storage format of 2-D weights: f32 | f16 | q8 | q4 | q4a
    scale_dtype: str | None  # of q8/q4 scales; None for f32/f16
    model_dtype: str  # what backends compute in
    embed: str | None = None  # embedding / lm_head format (None: as `linear`)
    q8: tuple[str, ...] = ()  # roles stored as q8 (ROLE_SUFFIX, optionally ":" a LAYER_RULES rule)
    calibrated: bool = False  # q4 scales searched with calibration importance
    gptq: bool = False  # calibrated by GPTQ: its q4a and q8 matrices (not the embedding) solved column by column
    summary: str = ""  # one line for `--help` and the docs' tables

    def bits_per_weight(self) -> tuple[float, float]:
        """Bits a stored weight takes, scales and zero points counted: (the linear format, the q8
        one of its more-bits matrices and embedding), from the QDIR layout itself."""
        linear = bits_per_weight(self.linear, self.scale_dtype)
        if self.linear in ("q4", "q4a") and (self.embed == "q8" or self.q8):
            return linear, bits_per_weight("q8", self.scale_dtype)
        return linear, linear

    def embed_format(self, embed_bits: int | None = None) -> str:
        check_embed_bits(embed_bits)
        if embed_bits is not None:
            return f"q{embed_bits}"
        return self.embed or self.linear

    def format_name(self, tensor: str, shape, embed_bits: int | None = None, num_layers: int | None = None) -> str:
        """The storage format name of one tensor under this scheme."""
        if len(shape) != 2:
            return "f32"  # norms: tiny and precision-critical
        if tensor in EMBED_NAMES:
            return self.embed_format(embed_bits)
        if self.linear in ("q4", "q4a") and self._wants_q8(tensor, num_layers):
            return "q8"
        return self.linear

    def _wants_q8(self, tensor: str, num_layers: int | None) -> bool:
        for role in self.q8:
            base, _, layers = role.partition(":")
            if not tensor.endswith(ROLE_SUFFIX[base]):
                continue
            if not layers:
                return True
            m = _LAYER.match(tensor)
            if m and num_layers and LAYER_RULES[layers](int(m.group(1)), num_layers):
                return True
        return False

    def format_for(self, tensor: str, shape, embed_bits: int | None = None, num_layers: int | None = None):
        """The format object (with its scale dtype) that stores `tensor` under this scheme."""
        fmt = self.format_name(tensor, shape, embed_bits, num_layers)
        scale = self.scale_dtype or self.model_dtype
        return get_format(fmt, scale if fmt in ("q8", "q4", "q4a") else None)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme("q0f32", "f32", None, "float32", summary="no quantization, fp32"),
        Scheme("q0f16", "f16", None, "float16", summary="no quantization, fp16"),
        Scheme("q8f16", "q8", "float16", "float16", summary="q8 everywhere"),
        Scheme("q4f16", "q4", "float16", "float16", embed="q8", q8=("attn_v",), calibrated=True,
               summary="q4, calibrated scale search; embeddings and attn v q8; fp16 compute"),
        Scheme("q4f32", "q4", "float32", "float32", embed="q8", q8=("attn_v",), calibrated=True,
               summary="as q4f16 with fp32 scales and compute"),
        Scheme("q4f16_m", "q4a", "float16", "float16", embed="q8", q8=("attn_v", "attn_k", "ffn_down:more", "ffn_up:ends"),
               calibrated=True, gptq=True,
               summary="medium: q4a (a zero point a group) by GPTQ on the calibration text; embeddings, attn k "
                       "and v, ffn down in llama.cpp's more-bits layers, ffn up in the first and last eighth q8 "
                       "(GPTQ is slower: ~1 min for SmolLM2)"),
        Scheme("q4f16_rtn", "q4", "float16", "float16", summary="q4 round to nearest everywhere (the earlier q4f16)"),
        Scheme("q4f32_rtn", "q4", "float32", "float32", summary="as q4f16_rtn, fp32"),
    ]
}


def get_scheme(name: str) -> Scheme:
    if isinstance(name, Scheme):
        return name
    try:
        return SCHEMES[name]
    except KeyError:
        raise EdgeforgeError(f"unknown quantization scheme '{name}' (known: {', '.join(SCHEMES)})") from None


def bits_per_weight(fmt: str, scale_dtype: str | None) -> float:
    """Stored bits per weight of a format (scales and zero points counted), from stored_arrays."""
    shape = (1, 2 * GROUP)  # two groups: q4a's zero points are two a byte
    arrays = stored_arrays(fmt, shape, scale_dtype or {"f32": "float32", "f16": "float16"}.get(fmt))
    total = sum(int(np.prod(dims)) * np.dtype(dtype).itemsize * 8 for dims, dtype in arrays.values())
    return total / (2 * GROUP)


def scheme_help() -> str:
    """The schemes for `--help`: name, bits a weight (the q8 matrices' after a slash), what it does."""
    lines = []
    for s in SCHEMES.values():
        linear, q8 = s.bits_per_weight()
        bits = f"{linear:g}" if linear == q8 else f"{linear:g} / {q8:g}"
        lines += textwrap.wrap(s.summary, 92, initial_indent=f"  {s.name:<10} {bits:<12}", subsequent_indent=" " * 25)
    return "\b\nSchemes (bits per stored weight, scales included; after the slash: the q8 matrices):\n" + "\n".join(lines)


def check_embed_bits(embed_bits) -> None:
    if embed_bits is not None and embed_bits not in EMBED_BITS_CHOICES:
        raise EdgeforgeError(f"--embed-bits {embed_bits}: use 4 or 8 (or leave it out for the scheme's choice)")
