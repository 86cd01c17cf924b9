"""Importers: bad input is a clear error naming the format and key; ignored input warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mpsearch.bitmap import BitMap
from mpsearch.export import ExportWarning, loads

FQN_TO = "FqnToConfig"


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(16, 16), nn.Linear(16, 16)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attn()


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


class Tiny(nn.Module):
    """Llama-like names: model.layers.N.self_attn.{q,k}_proj and lm_head (HQQ tags too)."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.lm_head = _Inner(), nn.Linear(16, 8)


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny()


def _torchao(cfg) -> dict:
    return {"_type": FQN_TO, "_data": {"fqn_to_config": {"lm_head": cfg}}}


def _intx(**data) -> dict:
    return {"_type": "IntxWeightOnlyConfig", "_data": data}


def _ct(weights, **group) -> dict:
    return {"config_groups": {"g": {"targets": ["model.layers.0.self_attn.q_proj"],
                                    "weights": weights, **group}}}


Q = "model.layers.0.self_attn.q_proj"
# (format, input, with model, exception, message part)
MALFORMED = [
    ("hawq", [4], False, TypeError, "hawq: bit_config must be a dict, got list"),
    ("hawq", {3: 4}, False, TypeError, "hawq: the keys of bit_config must be strings"),
    ("hawq", {"lm_head": "4"}, True, TypeError, "hawq: 'lm_head' has '4'; expected bits"),
    ("hawq", {"lm_head": 4.5}, True, ValueError, r"hawq: 'lm_head': w_bits must be one of"),
    ("hawq", {"lm_head": 9}, False, ValueError, r"hawq: 'lm_head': w_bits .* got 9"),
    ("hawq", {}, False, ValueError, "hawq: no layer found in the input"),
    ("hqq", 5, True, TypeError, "hqq: the config must be a dict, got int"),
    ("hqq", {"dynamic_config": [1]}, True, TypeError, "hqq: dynamic_config must be a dict"),
    ("hqq", {"self_attn.q_proj": 4}, True, TypeError,
     r"hqq: dynamic_config\['self_attn.q_proj'\] must be a dict, got int 4"),
    ("hqq", {"self_attn.q_proj": {"group_size": 64}}, True, ValueError,
     r"hqq: dynamic_config\['self_attn.q_proj'\] has no 'nbits'"),
    ("hqq", {"self_attn.q_proj": {"weight_quant_params": 3}}, True, TypeError,
     r"\['weight_quant_params'\] must be a dict"),
    ("hqq", {"self_attn.q_proj": {"nbits": "4"}}, True, TypeError,
     "hqq: .*: bits must be an integer, got '4'"),
    ("hqq", {"self_attn.q_proj": {"nbits": 4.5}}, True, ValueError,
     r"hqq: dynamic_config\['self_attn.q_proj'\]: w_bits must be one of .* got 4.5"),
    ("hqq", {"self_attn.q_proj": {"nbits": 4, "group_size": "64"}}, True, TypeError,
     "hqq: .*: group_size must be an integer, got '64'"),
    ("hqq", {"dynamic_config": {}, "skip_modules": "lm_head"}, True, TypeError,
     "hqq: skip_modules must be a list of names"),
    ("hqq", {"nbits": 4, "group_size": 64}, True, ValueError,
     "hqq: HqqConfig arguments without dynamic_config"),
    ("gptqmodel", [4], True, TypeError, "gptqmodel: the quantize config must be a dict"),
    ("gptqmodel", {"bits": 4, "dynamic": [1]}, True, TypeError,
     "gptqmodel: 'dynamic' must be a dict, got list"),
    ("gptqmodel", {"bits": 4, "dynamic": {"+:^lm_head$": 8}}, True, TypeError,
     r"gptqmodel: the overrides of rule '\+:\^lm_head\$' must be a dict"),
    ("gptqmodel", {"bits": 4, "dynamic": {"+:[": {}}}, True, ValueError,
     r"gptqmodel: rule '\+:\[' is not a regex"),
    ("gptqmodel", {"bits": "4"}, True, TypeError,
     f"gptqmodel: '{Q}': bits must be an integer, got '4'"),
    ("gptqmodel", {"bits": 4.5}, True, ValueError, "gptqmodel: .*w_bits must be one of"),
    ("gptqmodel", {"bits": 4, "group_size": "x"}, True, TypeError,
     "gptqmodel: .*group_size must be an integer"),
    ("gptqmodel", {"bits": 4, "sym": "no"}, True, ValueError,
     "gptqmodel: .*symmetric must be True or False, got 'no'"),
    ("gptqmodel", {"dynamic": {}}, True, ValueError, f"gptqmodel: no bits for '{Q}'"),
    ("compressed-tensors", 5, False, TypeError,
     "compressed-tensors: the quantization config must be a dict, got int"),
    ("compressed-tensors", {"config_groups": [1]}, False, TypeError,
     "compressed-tensors: config_groups must be a dict"),
    ("compressed-tensors", {"config_groups": {"g": {"weights": {"num_bits": 4}}}}, False,
     ValueError, r"compressed-tensors: config_groups\['g'\] has no 'targets'"),
    ("compressed-tensors", {"config_groups": {"g": {"targets": Q}}}, False, TypeError,
     "compressed-tensors: the targets of 'g' must be a list of names"),
    ("compressed-tensors", _ct(5), False, TypeError,
     f"compressed-tensors: the weights of the scheme of '{Q}' must be a dict"),
    ("compressed-tensors", _ct({"num_bits": "4"}), False, TypeError,
     f"compressed-tensors: '{Q}': bits must be an integer"),
    ("compressed-tensors", _ct({"num_bits": 4.5}), False, ValueError,
     "compressed-tensors: .*w_bits must be one of"),
    ("compressed-tensors", _ct({"num_bits": 4, "strategy": "block"}), False, ValueError,
     "compressed-tensors: .*granularity 'block' is not offered"),
    ("compressed-tensors", _ct({"num_bits": 4}, input_activations=8), False, TypeError,
     "compressed-tensors: the input_activations of the scheme of .* must be a dict"),
    ("compressed-tensors", {**_ct({"num_bits": 4}), "ignore": "lm_head"}, False, TypeError,
     "compressed-tensors: ignore must be a list of names"),
    ("compressed-tensors", _ct({"num_bits": 4.5}), True, ValueError,
     "compressed-tensors: not a valid QuantizationConfig"),
    ("compressed-tensors", {"config_groups": {"g": 5}}, True, ValueError,
     "compressed-tensors: not a valid QuantizationConfig"),
    ("torchao", 5, False, TypeError, "torchao: expected an FqnToConfig .*got int"),
    ("torchao", {"lm_head": None}, False, ValueError, "torchao: no 'fqn_to_config' in"),
    ("torchao", _intx(), False, ValueError,
     "torchao: expected an FqnToConfig, got a 'IntxWeightOnlyConfig'"),
    ("torchao", {"_type": FQN_TO, "_data": 5}, False, TypeError,
     "torchao: '_data' of the FqnToConfig must be a dict"),
    ("torchao", _torchao(5), False, TypeError,
     "torchao: the config of 'lm_head' must be a dict, got int"),
    ("torchao", _torchao(_intx(weight_dtype="int4")), False, TypeError,
     "torchao: weight_dtype of 'lm_head' must be a dict, got str"),
    ("torchao", _torchao(_intx(weight_dtype={"_data": "int9"})), False, ValueError,
     "torchao: 'lm_head': w_bits must be one of .* got 9"),
    ("torchao", _torchao(_intx(granularity={"_type": "PerGroup", "_data": {"group_size": "x"}})),
     False, TypeError, "torchao: 'lm_head': group_size must be an integer"),
    ("torchao", _torchao(_intx(granularity={"_type": "PerAxis", "_data": {"axis": 1}})),
     False, ValueError, "torchao: 'lm_head' has granularity PerAxis"),
    ("torchao", _torchao(_intx(mapping_type={"_data": "BOGUS"})), False, ValueError,
     "torchao: 'lm_head' has mapping_type 'BOGUS'"),
    ("llamacpp", 5, False, TypeError, "llamacpp: lines must be a list of 'PATTERN=TYPE'"),
    ("llamacpp", ["blk.0.attn_q.weight=q4_K", None], False, TypeError,
     "llamacpp: lines must be a list of 'PATTERN=TYPE' strings"),
    ("llamacpp", [], False, ValueError, "llamacpp: no layer found in the input"),
]


@pytest.mark.parametrize(("fmt", "obj", "with_model", "exc", "match"), MALFORMED,
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_input_is_a_clear_error(fmt, obj, with_model, exc, match, tiny):
    if fmt == "compressed-tensors" and with_model:
        pytest.importorskip("compressed_tensors")
    options = {"model": tiny} if with_model else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExportWarning)
        with pytest.raises(exc, match=match):
            BitMap.from_format(fmt, obj, **options)


def test_hawq_warns_of_keys_that_are_no_layer_but_not_of_activation_quantizers(tiny):
    acts = {"quant_input": 8, "quant_act_int32": 16, "model.layers.0.quant_act": 8,
            "model.layers.0.quant_act1": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportWarning)
        quiet = BitMap.from_format("hawq", {**acts, "lm_head": 4}, model=tiny)
    assert quiet.bits()["lm_head"] == 4
    with pytest.warns(ExportWarning, match=r"hawq: skipped \(not a layer of Tiny.*names=\) "
                                           r"for 2 key\(s\): lm_haed; quant_convbn1 \(as "):
        back = BitMap.from_format("hawq", {**acts, "lm_haed": 4, "quant_convbn1": 2, "k": 2},
                                  model=tiny, names={"quant_convbn1": "model.convbn1", "k": Q})
    assert back.bits() == {**dict.fromkeys(back.bits(), 32), Q: 2}


def test_hqq_warns_of_tags_no_layer_has(tiny):
    with pytest.warns(ExportWarning, match=r"hqq: ignored \(no layer has the tag.*for 1 "
                                           r"tag\(s\): self_attn.q_prj$"):
        back = BitMap.from_format("hqq", {"self_attn.q_prj": {"nbits": 4},
                                          "self_attn.k_proj": {"nbits": 2}}, model=tiny)
    assert back.bits() == {**dict.fromkeys(back.bits(), 32),
                           "model.layers.0.self_attn.k_proj": 2,
                           "model.layers.1.self_attn.k_proj": 2}


def test_gptqmodel_warns_of_rules_that_decide_no_layer(tiny):
    config = {"bits": 4, "dynamic": {r"+:.*\.0\..*": {"bits": 8}, r"-:.*layers\.0\.self.*": {},
                                     r"+:.*nothing": {"bits": 2}}}
    with pytest.warns(ExportWarning, match=r"gptqmodel: ignored \(decides no layer.*for 2 "
                                           r"rule\(s\): -:.*layers\\.0\\.self.*; \+:.*nothing"):
        back = BitMap.from_format("gptqmodel", config, model=tiny)
    assert back.bits()[Q] == 8 and back.bits()["model.layers.1.self_attn.q_proj"] == 4


def test_compressed_tensors_warns_of_targets_that_match_nothing(tiny):
    pytest.importorskip("compressed_tensors")
    doc = {"config_groups": {"g": {"targets": [Q, "model.nothing", "re:.*nothing", "Linear"],
                                   "weights": {"num_bits": 4}}}, "ignore": ["lm_hed"]}
    with pytest.warns(ExportWarning, match=r"compressed-tensors: ignored \(matches no module "
                                           r"of Tiny\) for 3 target\(s\): model.nothing; "
                                           r"re:.\*nothing; lm_hed"):
        back = BitMap.from_format("compressed-tensors", doc, model=tiny)
    assert set(back.bits().values()) == {4}


def test_torchao_fields_left_out_take_torchaos_defaults():
    dyn = {"_type": "Int8DynamicActivationIntxWeightConfig", "_data": {}}
    back = BitMap.from_format("torchao", {"_type": FQN_TO, "_data": {"fqn_to_config": {
        "a.b": _intx(), "c.d": dyn}}})
    assert (back["a.b"].w_bits, back["a.b"].a_bits, back["a.b"].qconfig.granularity) == (
        8, None, "channel")
    assert (back["c.d"].w_bits, back["c.d"].a_bits, back["c.d"].qconfig.group_size) == (8, 8, 32)
    assert back["a.b"].qconfig.symmetric and back["c.d"].qconfig.symmetric


def test_loads_names_the_format_of_text_that_is_not_json():
    with pytest.raises(ValueError, match="gptqmodel: not JSON"):
        loads("gptqmodel", "{'bits': 4}")
    with pytest.raises(TypeError, match="hawq: loads takes the text of a file, got dict"):
        loads("hawq", {"a": 4})  # type: ignore[arg-type]
    assert loads("hawq", b'{"a": 4}') == {"a": 4}  # a file read as bytes


@pytest.mark.parametrize(("fmt", "obj"), [("hawq", {}), ("hawq", {"quant_input": 8}),
                                          ("llamacpp", [])])
def test_input_naming_no_layer_of_the_model_gives_the_default_map_with_a_warning(
        fmt, obj, tiny):
    with pytest.warns(ExportWarning, match=f"{fmt}: the input names no layer of Tiny: every "
                                           "layer takes default_bits=4"):
        back = BitMap.from_format(fmt, obj, model=tiny, default_bits=4)
    assert set(back.bits().values()) == {4}
