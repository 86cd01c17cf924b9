"""Write notebooks/03_export.ipynb and execute it top to bottom with nbclient.

Run from the repository root: ``python notebooks/build_03_export.py`` (about a minute or
two on a 2-core CPU). The notebook is committed with the outputs of that run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

CELLS: list[tuple[str, str]] = [
    ("md", """# 03 — one bit map, every export format

mpsearch's bit map is the artefact users keep; other quantization tools each want the same
information in their own shape. This notebook searches one bit map for **all-MiniLM-L6-v2**
(a 6-layer BERT, 37 `nn.Linear` layers, real English text from gensim's Lee corpus) with
LLM-style group-wise weights, then exports it to every format mpsearch writes — and, where
the tool is installed, hands the export to **the tool itself** and reads back the bits it
applied:

| format | tool-side check in this notebook |
|---|---|
| mpsearch JSON | `BitMap.from_dict` |
| ONNX Runtime `TensorQuantOverrides` | `onnxruntime.quantization.quantize_static`, then the quantized graph's weight types |
| torchao `FqnToConfig` | `torchao.quantization.quantize_`, then each weight's `target_dtype` |
| HAWQ `bit_config` | round trip through the importer |
| llama.cpp `--tensor-type` | GGUF names checked against llama.cpp's `gguf` package |
| GPTQModel / vLLM `dynamic` | the rule lookup both tools run (`re.match`, first match) |
| compressed-tensors `config_groups` | `QuantizationConfig` + `apply_quantization_config` |
| HQQ `dynamic_config` | transformers' `HqqConfig` + `prepare_for_hqq_linear` |

Every export warns, naming the layers, where a format cannot say exactly what the map says."""),
    ("code", """import copy
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", message="IProgress not found")
import pandas as pd
import torch

import mpsearch
from mpsearch.quant import QuantConfig
from mpsearch.zoo.minilm import load_minilm, text_batches

torch.manual_seed(0)
torch.set_num_threads(2)
logging.getLogger().setLevel(logging.ERROR)  # ORT's pre-processing advice
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch")
warnings.filterwarnings("ignore", category=RuntimeWarning, module="onnxruntime")
pd.set_option("display.width", 120)
pd.set_option("display.max_colwidth", 200)
print("mpsearch", mpsearch.__version__, "| torch", torch.__version__)"""),
    ("md", """## The bit map

A 4-bit average budget, candidate bits {2, 3, 4, 8}, symmetric weights in groups of 128
(the INT4 LLM recipe), and query/key/value tied to one width so that runtimes fusing them
(vLLM's `qkv_proj`) can honour the map. The Hessian traces use few probes: this notebook is
about exports, not about the search."""),
    ("code", """model, tok = load_minilm()
calib = text_batches(tok, "calib", n_batches=2, batch_size=8, seed=0)
qconfig = QuantConfig(symmetric=True, granularity="group", group_size=128)
res = mpsearch.search(model, 4.0, data=calib, bits=(2, 3, 4, 8), qconfig=qconfig, tie="fused",
                      sensitivity=mpsearch.Hutchinson(tol=0.2, min_probes=8, max_probes=16),
                      seed=0, progress=False)
bitmap = res.bitmap
print(bitmap, f"| {bitmap.avg_bits():.3f} average bits | predicted {bitmap.predicted}")
table = pd.DataFrame({"w_bits": bitmap.bits()})
table["block"] = [n.split(".")[2] if n.startswith("encoder") else "-" for n in table.index]
table["layer"] = [n.split(".", 3)[-1] if n.startswith("encoder") else n for n in table.index]
table.pivot(index="layer", columns="block", values="w_bits")"""),
    ("md", "## mpsearch JSON (lossless)"),
    ("code", """doc = bitmap.export("mpsearch")
print({k: doc[k] for k in ("format", "format_version", "model", "budget")})
print("query of block 0:", doc["layers"]["encoder.layer.0.attention.self.query"])
assert mpsearch.BitMap.from_dict(doc).to_dict() == doc"""),
    ("md", """## ONNX Runtime: `TensorQuantOverrides` for `quantize_static`

Overrides are keyed by ONNX tensor names, so the export reads the ONNX graph to find each
layer's weight (here anonymous `onnx::MatMul_…` constants, found by module scope). 2- and
3-bit layers are held in int4, ORT's smallest QDQ type, and groups become per-channel
scales — the export says so. `with_excludes=True` returns complete `quantize_static`
keyword arguments: besides the overrides, only the map's layers are quantized
(`nodes_to_quantize`) and float layers are excluded; the activations the map keeps float
get 16 bits (ORT's static quantization quantizes every tensor a quantized node reads or
writes). Those keyword arguments go straight into ORT's own `quantize_static`, and the
quantized graph itself is read back: the type of every weight's `DequantizeLinear` input."""),
    ("code", """import tempfile
from pathlib import Path

from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from mpsearch.export import onnxruntime as ort_export

work = Path(tempfile.mkdtemp())
onnx_float = ort_export.to_onnx(model, calib[0], work / "minilm.onnx")
kwargs = bitmap.export("onnxruntime", onnx_model=onnx_float, with_excludes=True)
overrides = kwargs["extra_options"]["TensorQuantOverrides"]
print(len(overrides), "tensor overrides, e.g.", next(iter(overrides.items())))

quantize_static(str(onnx_float), str(work / "minilm.qdq.onnx"),
                ort_export.BatchReader(calib, onnx_float), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, **kwargs)
stored = ort_export.weight_bits(onnx_float, work / "minilm.qdq.onnx", bitmap)
check = pd.DataFrame({"asked": {n: bitmap[n].w_bits for n in stored},
                      "ORT type": {n: t for n, (t, _) in stored.items()},
                      "stored bits": {n: b for n, (_, b) in stored.items()}})
print(check.groupby(["asked", "ORT type"]).size().rename("layers").to_string())
assert all(check["stored bits"] == check["asked"].map({2: 4, 3: 4, 4: 4, 8: 8}))"""),
    ("md", """ORT picks its own min-max scales per output channel, while mpsearch's quantizer fits
each group of 128 by MSE: the same bit-widths, different grids. Both against the float
model, on held-out sentences:"""),
    ("code", """import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession(str(work / "minilm.qdq.onnx"), providers=["CPUExecutionProvider"])
evals = text_batches(tok, "eval", n_batches=1, batch_size=16, seed=0)
with torch.no_grad():
    ref = model(**evals[0]).last_hidden_state.numpy()
    ours = mpsearch.quantize(model, bitmap)(**evals[0]).last_hidden_state.numpy()
theirs = sess.run(None, ort_export.BatchReader(evals, onnx_float).feed(evals[0]))[0]


def cosine(a: np.ndarray) -> float:
    return float(np.mean(np.sum(a * ref, -1)
                         / (np.linalg.norm(a, axis=-1) * np.linalg.norm(ref, axis=-1))))


print(f"mean token cosine to float: ORT QDQ {cosine(theirs):.4f}, "
      f"mpsearch fake-quant {cosine(ours):.4f}")"""),
    ("md", """## torchao: `FqnToConfig`

Objects when torchao is installed (`IntxWeightOnlyConfig(weight_dtype=torch.int<b>,
granularity=PerGroup(128), …)` per layer, `None` for float layers), else torchao's own
serialised dict form. torchao's `quantize_` applies it; each weight becomes a tensor
subclass whose `target_dtype` is read back."""),
    ("code", """from torchao.quantization import quantize_

fqn_to_config = bitmap.export("torchao")
print(str(fqn_to_config).splitlines()[1:3])
qmodel = copy.deepcopy(model)
quantize_(qmodel, fqn_to_config, filter_fn=None)
modules = dict(qmodel.named_modules())
applied = {n: str(getattr(modules[n].weight, "target_dtype", "float")) for n in bitmap}
print(pd.Series(applied).value_counts().to_string())
assert all(applied[n] == f"torch.int{b}" for n, b in bitmap.bits().items() if b < 16)"""),
    ("md", "## HAWQ: `bit_config`"),
    ("code", """bit_config = bitmap.export("hawq")
print(dict(list(bit_config.items())[:6]))
back = mpsearch.BitMap.from_format("hawq", bit_config, model=model)
assert back.bits() == bitmap.bits()"""),
    ("md", """## llama.cpp: `--tensor-type PATTERN=TYPE`

BERT names map to GGUF names (`blk.N.attn_q`, …, as llama.cpp's `gguf-py` maps them; the
pooler has none and is skipped). MiniLM's rows hold 384 weights, not a multiple of
llama.cpp's 256-weight K-quant blocks: llama-quantize would fall back and *ignore* a `q4_K`
override, so those layers get the legacy type that holds their bits (`q4_0`, `q8_0`)."""),
    ("code", """import gguf

from mpsearch.export.llamacpp import gguf_name

lines = bitmap.export("llamacpp", strict=False)
print("\\n".join(lines[:6]), "\\n…")
print("llama-quantize", " ".join(f"--tensor-type '{line}'" for line in lines[:2]),
      "… minilm-f16.gguf minilm-mixed.gguf Q4_K_M")
names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, 6)
assert all(gguf_name(n, "bert") == names.get_name(n) for n in bitmap if n != "pooler.dense")"""),
    ("md", """## GPTQModel / vLLM: `dynamic` rules

One anchored rule per layer (`+:` with its bits, group size and symmetry; `-:` for float
layers), under a base config of the most common setting. Both tools look a module up with
`re.match` over the rules in order, first match wins — `resolve` runs that lookup."""),
    ("code", """from mpsearch.export.gptqmodel import resolve

gptq = bitmap.export("gptqmodel")
print({k: v for k, v in gptq.items() if k != "dynamic"})
print(dict(list(gptq["dynamic"].items())[:3]))
assert all(resolve(gptq, n)["bits"] == b for n, b in bitmap.bits().items() if b < 16)"""),
    ("md", """## compressed-tensors: `config_groups`

Layers with identical settings share a group listing their exact names; float layers go to
`ignore`. compressed-tensors' own pydantic model validates it, and its
`apply_quantization_config` attaches each layer's scheme."""),
    ("code", """from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

ct = bitmap.export("compressed-tensors")
config = QuantizationConfig.model_validate(ct)
print({g: (s.weights.num_bits, s.weights.strategy, s.weights.group_size, len(s.targets))
       for g, s in config.config_groups.items()}, "ignore:", config.ignore)
ctmodel = copy.deepcopy(model)
apply_quantization_config(ctmodel, config, show_progress=False)
modules = dict(ctmodel.named_modules())
assert all(modules[n].quantization_scheme.weights.num_bits == b
           for n, b in bitmap.bits().items() if b < 16)"""),
    ("md", """## HQQ: `dynamic_config`

HQQ keys its settings by *linear tag* — the module name without `layers` and block numbers —
so one projection has one setting in every block. Where the blocks of a projection differ,
the export gives the tag its widest layer and warns, naming every widened layer; transformers'
`HqqConfig` then applies exactly the exported widths."""),
    ("code", """from transformers import HqqConfig
from transformers.integrations.hqq import prepare_for_hqq_linear

hqq_kwargs = bitmap.export("hqq")
print(hqq_kwargs)
hqmodel = prepare_for_hqq_linear(copy.deepcopy(model), quantization_config=HqqConfig(**hqq_kwargs))
nbits = {n: m.quant_config["weight_quant_params"]["nbits"]
         for n, m in hqmodel.named_modules() if getattr(m, "quant_config", None)}
widened = sum(nbits[n] > b for n, b in bitmap.bits().items() if n in nbits)
print(f"{len(nbits)} layers quantized by HQQ, {widened} of them above the map's bits")"""),
    ("md", """## Summary

What each format could say exactly (same bits as the map) for this bit map:"""),
    ("code", """from mpsearch.export import ExportWarning

rows = []
for fmt, opts in [("mpsearch", {}), ("onnxruntime", {"onnx_model": onnx_float}), ("torchao", {}),
                  ("hawq", {}), ("llamacpp", {"strict": False}), ("gptqmodel", {}),
                  ("compressed-tensors", {}), ("hqq", {})]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", ExportWarning)
        bitmap.export(fmt, **opts)
    notes = [str(w.message).split(" for ")[0].split(": ", 1)[1] for w in record
             if issubclass(w.category, ExportWarning)]
    rows.append({"format": fmt, "warnings": "; ".join(notes) or "exact"})
pd.DataFrame(rows).set_index("format")"""),
]


def build(path: Path = HERE / "03_export.ipynb", timeout_s: int = 1200) -> Path:
    """Write the notebook and execute it in place (outputs saved)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md"
                else nbformat.v4.new_code_cell(src) for kind, src in CELLS]
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE.parent)}}).execute()
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "03_export.ipynb"))
