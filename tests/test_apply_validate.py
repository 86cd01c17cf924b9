"""quantize / quantize_ / validate on real models, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch import BitMap, QuantConfig
from mpsearch.cli import main
from mpsearch.quant import fake_quantize
from mpsearch.quant.apply import quantize_weight


def test_quantize_copies_and_matches_quantizer(mnist_cnn) -> None:  # type: ignore[no-untyped-def]
    before = {k: v.clone() for k, v in mnist_cnn.state_dict().items()}
    bm = BitMap.from_bits(mnist_cnn, {"classifier.0": 3, "features.0": 32}, default=4)
    q = mpsearch.quantize(mnist_cnn, bm)
    assert q is not mnist_cnn
    assert all(torch.equal(before[k], v) for k, v in mnist_cnn.state_dict().items())
    cfg = bm["classifier.0"].qconfig
    w = mnist_cnn.classifier[0].weight
    assert torch.equal(q.classifier[0].weight, fake_quantize(w, 3, cfg))
    assert torch.equal(q.features[0].weight, mnist_cnn.features[0].weight)  # 32 = float
    # a 3-bit per-channel grid has at most 8 distinct values per output row
    assert max(len(torch.unique(row)) for row in q.classifier[0].weight) <= 8
    assert torch.equal(q.classifier[0].bias, mnist_cnn.classifier[0].bias)


def test_hf_conv1d_quantized_per_output_channel() -> None:
    w = torch.randn(16, 8)  # Conv1D stores (in, out)
    cfg = QuantConfig(granularity="channel")
    q = quantize_weight(w, "Conv1D", 2, cfg)
    assert q.shape == w.shape
    assert all(len(torch.unique(q[:, j])) <= 4 for j in range(8))  # a column = one output


def test_activation_bits_add_hooks_on_copy_only(mnist_cnn, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    bm = BitMap.uniform(mnist_cnn, 8, a_bits=4)
    q = mpsearch.quantize(mnist_cnn, bm)
    assert len(q.classifier[0]._forward_pre_hooks) == 1
    assert not mnist_cnn.classifier[0]._forward_pre_hooks
    r8 = mpsearch.validate(mnist_cnn, BitMap.uniform(mnist_cnn, 8), data=mnist_eval[:1],
                           progress=False)
    r84 = mpsearch.validate(mnist_cnn, bm, data=mnist_eval[:1], progress=False)
    assert r84.output_divergence > r8.output_divergence  # 4-bit activations cost something


def test_quantize_in_place(mnist_cnn) -> None:  # type: ignore[no-untyped-def]
    import copy

    model = copy.deepcopy(mnist_cnn)
    out = mpsearch.quantize_(model, BitMap.uniform(model, 2))
    assert out is model
    assert not torch.equal(model.classifier[0].weight, mnist_cnn.classifier[0].weight)


def test_validate_known_figures(mnist_cnn, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    from mpsearch.zoo.mnist import accuracy

    r32 = mpsearch.validate(mnist_cnn, BitMap.uniform(mnist_cnn, 32), data=mnist_eval,
                            loss_fn="task", progress=False)
    assert r32.accuracy_float == pytest.approx(accuracy(mnist_cnn, mnist_eval), abs=1e-6)
    assert r32.accuracy_quantized == r32.accuracy_float and r32.output_divergence == 0.0
    assert r32.agreement == 1.0 and r32.loss_kind == "cross_entropy"
    assert r32.size_bytes_quantized == r32.size_bytes_float
    r8 = mpsearch.validate(mnist_cnn, BitMap.uniform(mnist_cnn, 8), data=mnist_eval,
                           progress=False)
    r2 = mpsearch.validate(mnist_cnn, BitMap.uniform(mnist_cnn, 2), data=mnist_eval,
                           progress=False)
    assert 0 < r8.output_divergence < r2.output_divergence
    assert r8.accuracy_quantized is not None and r8.accuracy_quantized > 0.94
    assert r8.size_bytes_float / r8.size_bytes_quantized > 3.5  # int8 + per-channel scales
    assert r2.avg_bits == 2.0 and r2.n_samples == 1000
    assert "accuracy" in str(r8) and json.dumps(r8.to_dict())


def test_validate_names_the_outputs_it_does_not_compare(mnist_cnn, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    """A model with two heads: the report's divergence is the first head's, and it says
    which output it left out (a map can wreck the other head unseen)."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.value = mnist_cnn, nn.Linear(10, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.body(x)
            return logits, self.value(logits)

    model = TwoHeads().eval()
    data = mnist_eval[:1]
    report = mpsearch.validate(model, BitMap.uniform(model, 4), data=data, progress=False)
    assert report.outputs_not_compared == ["[1] (250, 1)"]
    assert "not compared: [1] (250, 1)" in str(report)
    alone = mpsearch.validate(mnist_cnn, BitMap.uniform(mnist_cnn, 4), data=data,
                              progress=False)
    assert alone.outputs_not_compared == [] and "not compared" not in str(alone)


def test_validate_rejects_foreign_bitmap(mnist_cnn, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(mpsearch.BitMapError, match="does not fit"):
        mpsearch.validate(mnist_cnn, BitMap.uniform(other, 4), data=mnist_eval, progress=False)


def cli_model() -> nn.Module:
    from mpsearch.zoo.mnist import pretrained_mnist

    return pretrained_mnist("cnn")


def cli_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from mpsearch.zoo.mnist import mnist_batches

    return mnist_batches("calib", batch_size=50, n_batches=2)


def test_cli_search_and_validate(tmp_path: Path, capsys, monkeypatch, model_cache) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MPSEARCH_CACHE", str(model_cache))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    out = tmp_path / "bm.json"
    spec = "test_apply_validate:cli_model"
    data = "test_apply_validate:cli_data"
    assert main(["search", "--model", spec, "--data", data, "--avg-bits", "4", "--out",
                 str(out), "--json", "-q", "--max-probes", "6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["predicted"]["avg_bits"] <= 4.0 + 1e-9 and out.exists()
    assert main(["validate", "--model", spec, "--data", data, "--bitmap", str(out),
                 "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["avg_bits"] <= 4.0 + 1e-9
    assert main(["search", "--model", spec, "--data", data, "--avg-bits", "1", "-q",
                 "--max-probes", "4", "--out", str(out)]) == 1
    assert "smallest achievable 2" in capsys.readouterr().err
    assert main(["search", "--model", "nope", "--data", data, "--avg-bits", "4"]) == 1
    assert "package.module:function" in capsys.readouterr().err


def test_the_deployed_output_error_counts_real_tokens_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Padding positions carry no text: the deployed model's error against the float
    model is measured over the positions the attention mask marks real, as the output
    divergence is (here a third of the positions are padding)."""
    ort = pytest.importorskip("onnxruntime")

    class Tokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(50, 16)
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.proj(self.embed(input_ids)) + 10 * attention_mask.unsqueeze(-1).float()

    torch.manual_seed(0)
    model = Tokens().eval()
    ids = torch.randint(1, 50, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0
    ids[:, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    bitmap = BitMap.from_bits(model, {"proj": 8})
    rep = mpsearch.validate(model, bitmap, data=[batch], measure_latency=True, progress=False)
    path = mpsearch.export_onnx(model, bitmap, tmp_path / "t.onnx", sample_batch=batch)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.as_tensor(sess.run(None, {i.name: batch[i.name].numpy()
                                        for i in sess.get_inputs()})[0])
    with torch.no_grad():
        ref = model(**batch)
    real = mask.bool()
    expected = float((y - ref)[real].norm() / ref[real].norm())
    everywhere = float((y - ref).norm() / ref.norm())
    assert abs(everywhere / expected - 1) > 0.05  # padding would change the figure
    assert rep.deployed_batches == 1
    assert rep.deployed_rel_error == pytest.approx(expected, rel=1e-4)


def test_validate_compares_a_prediction_only_in_its_own_loss(  # type: ignore[no-untyped-def]
        mnist_cnn, mnist_calib, mnist_eval, caplog) -> None:
    """A map searched on the label loss predicts a label-loss increase; validated with the
    default divergence it printed that prediction beside a measured KL, as if comparable."""
    res = mpsearch.search(mnist_cnn, 4.0, data=mnist_calib[:2], loss_fn="task",
                          sensitivity="fisher", refine=False, slices=None, progress=False)
    assert res.bitmap.provenance["loss"] == "cross_entropy"
    with caplog.at_level("WARNING", logger="mpsearch"):
        kl = mpsearch.validate(mnist_cnn, res.bitmap, data=mnist_eval[:1], progress=False)
    assert kl.loss_kind == "kl" and kl.loss_increase_predicted is None
    assert "no prediction to compare" in caplog.text and "predicted" not in str(kl)
    task = mpsearch.validate(mnist_cnn, res.bitmap, data=mnist_eval[:1], loss_fn="task",
                             progress=False)
    assert task.loss_increase_predicted == pytest.approx(res.bitmap.predicted["loss_increase"])


def test_accuracy_of_a_causal_lm_given_labels_is_of_the_next_token() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=20,
                                     n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 20, (4, 12))
    with torch.no_grad():
        predicted = model(input_ids=ids).logits.argmax(-1)
    expected = float((predicted[:, :-1] == ids[:, 1:]).float().mean())
    report = mpsearch.validate(model, mpsearch.BitMap.uniform(model, 8),
                               data=[{"input_ids": ids, "labels": ids}], progress=False)
    assert report.accuracy_float == pytest.approx(expected)


def test_accuracy_and_agreement_count_samples_over_unequal_batches(mnist_cnn, mnist_eval) -> None:  # type: ignore[no-untyped-def]
    """Batches of 100, 100, 100 and 41: accuracy was the mean of the four batch accuracies
    (0.9692 for a reviewer's CNN whose accuracy over the 341 digits is 0.9765)."""
    x = torch.cat([b[0] for b in mnist_eval])[:341]
    y = torch.cat([b[1] for b in mnist_eval])[:341]
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 341, 100)]
    assert [len(b[1]) for b in batches] == [100, 100, 100, 41]
    bitmap = BitMap.uniform(mnist_cnn, 2)
    report = mpsearch.validate(mnist_cnn, bitmap, data=batches, progress=False)
    quantized = mpsearch.quantize(mnist_cnn, bitmap)
    with torch.no_grad():
        pf, pq = mnist_cnn(x).argmax(-1), quantized(x).argmax(-1)
    assert report.accuracy_float == pytest.approx(float((pf == y).sum()) / 341, abs=1e-12)
    assert report.accuracy_quantized == pytest.approx(float((pq == y).sum()) / 341, abs=1e-12)
    assert report.agreement == pytest.approx(float((pf == pq).sum()) / 341, abs=1e-12)
