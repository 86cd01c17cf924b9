"""llama.cpp export: GGUF names as llama.cpp's gguf-py maps them, types ggml knows."""

from __future__ import annotations

import re

import pytest
import torch
from export_maps import cycled

from mpsearch.bitmap import BitMap
from mpsearch.export import ExportWarning, dumps, loads
from mpsearch.export import llamacpp as ex

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A real Hugging Face Llama architecture, small (its names and shapes are what count)."""
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _gguf_names(fqns, arch):
    gguf = pytest.importorskip("gguf")
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "bert": gguf.MODEL_ARCH.BERT}[arch]
    table = gguf.get_tensor_name_map(arch_enum, 8)
    return {f: table.get_name(f) for f in fqns}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_names_agree_with_llama_cpps_own_mapping(arch, llama, minilm):
    model = llama if arch == "llama" else minilm[0]
    fqns = list(BitMap.uniform(model, 4))
    ours = {f: ex.gguf_name(f, arch) for f in fqns}
    assert ours == _gguf_names(fqns, arch)
    assert sum(v is not None for v in ours.values()) == (15 if arch == "llama" else 36)


def _regex_targets(line: str, tensor_names: list[str]) -> list[str]:
    """What llama-quantize does with a line: split at '=', lower-case, regex_search."""
    pattern, _, _ = line.partition("=")
    return [t for t in tensor_names if re.search(pattern.lower(), t)]


def test_lines_hit_exactly_their_tensor_with_a_known_type(llama):
    gguf = pytest.importorskip("gguf")
    bitmap = cycled(llama, [2, 3, 4, 5, 6, 8, 16, 32])
    lines = ex.export(bitmap)
    tensors = [f"{ex.gguf_name(f, 'llama')}.weight" for f in bitmap]
    tensors += ["token_embd.weight", "blk.0.attn_norm.weight", "blk.10.attn_q.weight"]
    known = {t.name.lower() for t in gguf.GGMLQuantizationType}
    for line, fqn in zip(lines, bitmap):
        _pattern, _, ggml = line.partition("=")
        assert _regex_targets(line, tensors) == [f"{ex.gguf_name(fqn, 'llama')}.weight"]
        assert ggml.lower() in known
        assert ex.TYPE_BITS[ggml.lower()] == bitmap[fqn].w_bits
    assert dumps("llamacpp", lines).splitlines() == lines


def test_rows_not_multiple_of_256_get_legacy_types(minilm):
    model, _ = minilm
    bitmap = cycled(model, [2, 4, 5, 6, 8])
    with pytest.raises(ValueError, match="pooler.dense"):
        ex.export(bitmap)
    with pytest.warns(ExportWarning, match="rows not a multiple of 256"):
        lines = ex.export(bitmap, strict=False)
    types = dict(line.split("=") for line in lines)
    query0 = r"^blk\.0\.attn_q\.weight$"
    legacy = {2: "q4_0", 4: "q4_0", 5: "q5_0", 6: "q8_0", 8: "q8_0"}
    # 384 rows: a K-quant would fall back and drop the override, so the legacy type is written
    assert types[query0] == legacy[bitmap["encoder.layer.0.attention.self.query"].w_bits]
    ffn_down = r"^blk\.0\.ffn_down\.weight$"  # 1536 rows = 6 × 256: K-quants apply
    assert types[ffn_down] == {2: "q2_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0"}[
        bitmap["encoder.layer.0.output.dense"].w_bits]


def test_import_round_trip(llama):
    bitmap = cycled(llama, [2, 3, 4, 5, 6, 8, 16, 32])
    text = dumps("llamacpp", ex.export(bitmap))
    back = BitMap.from_format("llamacpp", loads("llamacpp", text), model=llama)
    assert back.bits() == bitmap.bits()
    bare = BitMap.from_format("llamacpp", text, arch="llama")
    assert bare.bits() == bitmap.bits()
    with pytest.raises(ValueError, match="regex over several"):
        BitMap.from_format("llamacpp", [r"\.attn_q=q4_K"])
    with pytest.raises(ValueError, match="unknown ggml type"):
        BitMap.from_format("llamacpp", ["blk.0.attn_q.weight=q9_Z"])


def test_cnn_has_no_gguf_names(mnist_cnn):
    with pytest.raises(ValueError, match="Llama or BERT naming"):
        ex.export(BitMap.uniform(mnist_cnn, 4))


def test_a_tag_of_every_block_expands_to_the_models_blocks(llama):
    """llama-quantize's ``--tensor-type ffn_down=q2_k`` applies to every block: it
    imported as a layer named 'model.layers.{0}.mlp.down_proj'."""
    back = BitMap.from_format("llamacpp", ["ffn_down=q2_K", "attn_q.weight=q4_K",
                                           "blk.1.attn_q.weight=q8_0"], model=llama)
    bits = back.bits()
    assert not any("{" in n for n in bits)
    assert [bits[f"model.layers.{i}.mlp.down_proj"] for i in (0, 1)] == [2, 2]
    assert [bits[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1)] == [4, 8]
    with pytest.raises(ValueError, match="'ffn_down' names that tensor in every block: pass "
                                         "model="):
        BitMap.from_format("llamacpp", ["ffn_down=q2_K"])
    with pytest.raises(ValueError, match="has no such layer"):
        BitMap.from_format("llamacpp", ["ffn_up=q2_K"], arch="bert",
                           model=torch.nn.Sequential(torch.nn.Linear(4, 4)))
