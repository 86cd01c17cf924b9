"""llama.cpp ``llama-quantize --tensor-type PATTERN=TYPE`` lines.

Documented in llama.cpp's ``tools/quantize/README.md`` ("``--tensor-type`` quantize
specific tensor(s) to specific quant types. Supports regex syntax. May be specified
multiple times.") and implemented in ``tools/quantize/quantize.cpp``
(``parse_tensor_type``: split at ``=``, pattern lower-cased, type matched
case-insensitively against ``ggml_type_name``) and ``src/llama-quant.cpp``
(``std::regex_search`` of each pattern on the GGUF tensor name; the last match wins).
The same lines, one per line and nothing else, make a ``--tensor-type-file``.

GGUF tensor names follow llama.cpp's ``gguf-py/gguf/tensor_mapping.py``; built in here:

- Llama family (Llama, Mistral, Qwen2, …): ``model.layers.N.self_attn.{q,k,v,o}_proj`` →
  ``blk.N.attn_{q,k,v,output}``, ``model.layers.N.mlp.{gate,up,down}_proj`` →
  ``blk.N.ffn_{gate,up,down}``, ``lm_head`` → ``output``, ``model.embed_tokens`` →
  ``token_embd``;
- BERT: ``encoder.layer.N.attention.self.{query,key,value}`` → ``blk.N.attn_{q,k,v}``,
  ``…attention.output.dense`` → ``attn_output``, ``…intermediate.dense`` → ``ffn_up``,
  ``…output.dense`` → ``ffn_down``.

Bits → ggml types: 2–6 → ``q2_K`` … ``q6_K``, 7–8 → ``q8_0``, 16 → ``f16``, 32 → ``f32``.
K-quants need rows (input features) that are a multiple of 256; llama.cpp silently
falls back to another type for other rows *and then ignores the override*, so such
layers get the legacy type that holds their bits (``q4_0``, ``q5_0``, ``q8_0``; block of
32) and a warning says so. Pass a quantized base type (e.g. ``Q4_K_M``) to
``llama-quantize``: overrides apply to tensors it quantizes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from mpsearch.export._common import (
    build_bitmap,
    exact_pattern,
    expect_names,
    in_features,
    literal_of,
    warn,
)

if TYPE_CHECKING:
    from torch import nn

    from mpsearch.bitmap import BitMap, LayerEntry

FORMAT = "llamacpp"
QK_K = 256  # K-quant super-block: row length must be a multiple
QK_LEGACY = 32  # q4_0 / q5_0 / q8_0 block
K_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 7: "q8_0", 8: "q8_0",
           16: "f16", 32: "f32"}
LEGACY_TYPES = {2: "q4_0", 3: "q4_0", 4: "q4_0", 5: "q5_0", 6: "q8_0", 7: "q8_0", 8: "q8_0",
                16: "f16", 32: "f32"}
# ggml type name (lower case) → bits it stores per weight, rounded down to ours.
TYPE_BITS = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8, "q8_1": 8, "q8_k": 8, "q6_k": 6,
             "q5_0": 5, "q5_1": 5, "q5_k": 5, "q4_0": 4, "q4_1": 4, "q4_k": 4, "iq4_nl": 4,
             "iq4_xs": 4, "q3_k": 3, "iq3_xxs": 3, "iq3_s": 3, "q2_k": 2, "iq2_xxs": 2,
             "iq2_xs": 2, "iq2_s": 2}

_LAYER = r"(?:model\.)?layers\.(\d+)\."
_BERT = r"(?:bert\.)?encoder\.layer\.(\d+)\."
ARCHS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": (
        (_LAYER + r"self_attn\.q_proj", "blk.{0}.attn_q"),
        (_LAYER + r"self_attn\.k_proj", "blk.{0}.attn_k"),
        (_LAYER + r"self_attn\.v_proj", "blk.{0}.attn_v"),
        (_LAYER + r"self_attn\.o_proj", "blk.{0}.attn_output"),
        (_LAYER + r"mlp\.gate_proj", "blk.{0}.ffn_gate"),
        (_LAYER + r"mlp\.up_proj", "blk.{0}.ffn_up"),
        (_LAYER + r"mlp\.down_proj", "blk.{0}.ffn_down"),
        (r"lm_head", "output"),
        (r"(?:model\.)?embed_tokens", "token_embd"),
    ),
    "bert": (
        (_BERT + r"attention\.self\.query", "blk.{0}.attn_q"),
        (_BERT + r"attention\.self\.key", "blk.{0}.attn_k"),
        (_BERT + r"attention\.self\.value", "blk.{0}.attn_v"),
        (_BERT + r"attention\.output\.dense", "blk.{0}.attn_output"),
        (_BERT + r"intermediate\.dense", "blk.{0}.ffn_up"),
        (_BERT + r"output\.dense", "blk.{0}.ffn_down"),
    ),
}
# GGUF name → HF name (the canonical spelling) for imports.
_REVERSE = {
    "llama": {"attn_q": "model.layers.{0}.self_attn.q_proj",
              "attn_k": "model.layers.{0}.self_attn.k_proj",
              "attn_v": "model.layers.{0}.self_attn.v_proj",
              "attn_output": "model.layers.{0}.self_attn.o_proj",
              "ffn_gate": "model.layers.{0}.mlp.gate_proj",
              "ffn_up": "model.layers.{0}.mlp.up_proj",
              "ffn_down": "model.layers.{0}.mlp.down_proj",
              "output": "lm_head", "token_embd": "model.embed_tokens"},
    "bert": {"attn_q": "encoder.layer.{0}.attention.self.query",
             "attn_k": "encoder.layer.{0}.attention.self.key",
             "attn_v": "encoder.layer.{0}.attention.self.value",
             "attn_output": "encoder.layer.{0}.attention.output.dense",
             "ffn_up": "encoder.layer.{0}.intermediate.dense",
             "ffn_down": "encoder.layer.{0}.output.dense"},
}


def gguf_name(fqn: str, arch: str) -> str | None:
    """GGUF tensor base name (without ``.weight``) of a Hugging Face module FQN, or None."""
    for pattern, template in ARCHS[arch]:
        m = re.fullmatch(pattern, fqn)
        if m:
            return template.format(*m.groups())
    return None


def detect_arch(names: Iterable[str], strict: bool = True) -> str:
    """The built-in name mapping that covers most of ``names`` ("llama" or "bert").

    Raises:
        ValueError: (with ``strict``) neither mapping covers any name.
    """
    names = list(names)
    counts = {arch: sum(gguf_name(n, arch) is not None for n in names) for arch in ARCHS}
    best = max(counts, key=lambda a: counts[a])
    if counts[best] == 0 and strict:
        raise ValueError(f"llamacpp: no layer name matches the Llama or BERT naming "
                         f"(e.g. {names[:3]}); pass names={{fqn: gguf_name}}")
    return best


def _ggml_type(entry: LayerEntry, types: Mapping[int, str], k_rows: list[str],
               fqn: str) -> str:
    ggml = types[entry.w_bits]
    rows = in_features(entry)
    if ggml.lower().endswith("_k") and rows is not None and rows % QK_K:
        ggml = LEGACY_TYPES[entry.w_bits]
        if rows % QK_LEGACY:
            ggml = "f16"
        k_rows.append(f"{fqn} ({entry.w_bits} bits, rows of {rows}: {ggml})")
    return ggml


def export(bitmap: BitMap, *, arch: str = "auto", names: Mapping[str, str] | None = None,
           types: Mapping[int, str] | None = None, strict: bool = True) -> list[str]:
    """``PATTERN=TYPE`` lines for ``llama-quantize --tensor-type`` (or a --tensor-type-file).

    Args:
        bitmap: the bit map (of a Hugging Face model of a supported family).
        arch: ``"llama"``, ``"bert"`` or ``"auto"`` (the one matching most layer names).
        names: our FQN → GGUF tensor base name (``blk.0.attn_q``), overriding the mapping.
        types: bits → ggml type name, overriding the defaults (e.g. ``{4: "q4_0"}``).
        strict: raise on layers with no GGUF name; ``False`` skips them with a warning.

    Raises:
        ValueError: unknown ``arch``, or (with ``strict``) layers without a GGUF name.
    """
    names = dict(names or {})
    table = {**K_TYPES, **(types or {})}
    if arch == "auto":
        unnamed = [n for n in bitmap if n not in names]
        arch = detect_arch(unnamed, strict) if unnamed else "llama"
    if arch not in ARCHS:
        raise ValueError(f"llamacpp: arch must be 'auto' or one of {sorted(ARCHS)}, got {arch!r}")
    lines: list[str] = []
    unmapped: list[str] = []
    k_rows: list[str] = []
    widened: list[str] = []
    for fqn, entry in bitmap.items():
        base = names.get(fqn) or gguf_name(fqn, arch)
        if base is None:
            unmapped.append(fqn)
            continue
        if entry.w_bits == 7:
            widened.append(f"{fqn} (7 bits as q8_0)")
        ggml = _ggml_type(entry, table, k_rows, fqn)
        lines.append(f"{exact_pattern(base + '.weight')}={ggml}")
    if unmapped and strict:
        raise ValueError(f"llamacpp: no GGUF name for {len(unmapped)} layer(s) under the "
                         f"{arch!r} mapping: {unmapped[:8]}; pass names= or strict=False")
    warn(FORMAT, [f"{n} (no GGUF name, left to llama-quantize)" for n in unmapped],
         "layers skipped")
    warn(FORMAT, widened, "bits widened to the nearest ggml type")
    warn(FORMAT, k_rows, f"rows not a multiple of {QK_K} (K-quants would fall back and "
         "ignore the override); legacy type used")
    return lines


def _blocks(template: str, tag: str, model: nn.Module | None) -> list[str]:
    """The FQNs of ``model``'s layers that ``template`` (with ``{0}`` for the block)
    names, for a tag of every block."""
    if model is None:
        raise ValueError(f"llamacpp: {tag!r} names that tensor in every block: pass model= "
                         f"(the CLI's --model) to expand it to the model's blocks, or name "
                         f"one block (blk.0.{tag})")
    from mpsearch.layers import quantizable_modules

    pattern = re.escape(template).replace(re.escape("{0}"), r"\d+")
    found = [n for n in quantizable_modules(model) if re.fullmatch(pattern, n)]
    if not found:
        raise ValueError(f"llamacpp: {tag!r} names {template.format('N')} in every block, "
                         f"and {type(model).__name__} has no such layer")
    return found


def import_(lines: str | Sequence[str], *, arch: str = "llama",
            model: nn.Module | None = None, names: Mapping[str, str] | None = None,
            default_bits: int | None = 32) -> BitMap:
    """A bit map from ``PATTERN=TYPE`` lines (or the text of a --tensor-type-file).

    Patterns must name one tensor (``^blk\\.0\\.attn_q\\.weight$`` or plain
    ``blk.0.attn_q.weight``), or be a tag of every block (``ffn_down``, as
    llama-quantize's ``--tensor-type ffn_down=q2_k``), which ``model`` expands to its
    blocks; the GGUF name is mapped back to the Hugging Face FQN of ``arch`` (or through
    ``names``: GGUF base name → FQN).

    Raises:
        ValueError: a malformed line, an unknown ggml type, a pattern that is a regex
            over several tensors, or a tag of every block without ``model``.
        TypeError: ``lines`` is not text or a list of strings.
    """
    from mpsearch.bitmap import LayerEntry

    lines = expect_names(FORMAT, lines.split() if isinstance(lines, str) else lines, "lines",
                         "'PATTERN=TYPE' strings")
    if arch not in _REVERSE:
        raise ValueError(f"llamacpp: arch must be one of {sorted(_REVERSE)}, got {arch!r}")
    rename = dict(names or {})
    settings: dict[str, LayerEntry] = {}
    for line in lines:
        pattern, sep, ggml = line.strip().partition("=")
        if not sep or not pattern or not ggml:
            raise ValueError(f"llamacpp: malformed line {line!r}; expected PATTERN=TYPE")
        bits = TYPE_BITS.get(ggml.lower())
        if bits is None:
            raise ValueError(f"llamacpp: unknown ggml type {ggml!r} in {line!r}; known: "
                             f"{sorted(TYPE_BITS)}")
        name = literal_of(pattern) or (pattern if re.fullmatch(r"[\w.]+", pattern) else None)
        if name is None:
            raise ValueError(f"llamacpp: pattern {pattern!r} is a regex over several "
                             "tensors; mpsearch imports one tensor per line")
        base = name.removesuffix(".weight")
        fqn = rename.get(base)
        if fqn is None:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
            template = _REVERSE[arch].get(m.group(2) if m else base)
            if template is None:
                raise ValueError(f"llamacpp: no {arch} layer for GGUF tensor {base!r}; "
                                 "pass names={gguf_name: fqn}")
            if not m and "{0}" in template:  # a tag of every block (llama-quantize's
                # regex `ffn_down` matches blk.N.ffn_down for every N)
                for block in _blocks(template, base, model):
                    settings[block] = LayerEntry(w_bits=bits)
                continue
            fqn = template.format(m.group(1)) if m else template
        settings[fqn] = LayerEntry(w_bits=bits)
    return build_bitmap(settings, source=FORMAT, model=model, default_bits=default_bits)
