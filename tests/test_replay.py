"""Prefix replay gives exactly the losses of full forward passes, on any model shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mpsearch._replay import PrefixReplay
from mpsearch.layers import weight_key
from mpsearch.losses import Objective

CPU = torch.device("cpu")


class _Block(nn.Module):
    """torchvision-style residual block: in-place add and one ReLU module used twice."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += x
        return self.relu(out)


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


class _Tied(nn.Module):
    """An embedding and an output layer sharing one weight (as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.emb(ids))))


class _Encoder(nn.Module):
    """PyTorch's own transformer: MultiheadAttention reads ``out_proj.weight`` directly, so
    that Linear never runs its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(ids)))


def _check_exact(model: nn.Module, batches: list, names: list[str]) -> None:  # type: ignore[type-arg]
    torch.manual_seed(1)
    objective = Objective(batches)
    objective.prepare(model, CPU)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with PrefixReplay(model, objective, CPU, names) as replay:
        base = replay.record()
        assert np.allclose(base, 0.0, atol=1e-7)  # KL of the float model to itself
        for name in names:
            w = model.get_parameter(weight_key(model, name))
            changed = {name: w + 0.05 * torch.randn_like(w)}
            fast = replay.losses(changed)
            slow = replay.losses(changed, replay=False)
            assert np.allclose(fast, slow, rtol=1e-5, atol=1e-9), name
            assert fast.mean() > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all("forward" not in vars(m) for m in model.modules())


def test_replay_matches_full_passes_residual_inplace() -> None:
    torch.manual_seed(0)
    model = _ResNet().eval()
    batches = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    _check_exact(model, batches, ["stem", "blocks.0.conv1", "blocks.1.conv2", "head"])


class _UNet(nn.Module):
    """CRAFT / VGG-style U-net: each stage *starts* with ``ReLU(inplace=True)``, so it
    rewrites the previous stage's output, which the decoder also reads as a skip tensor.
    Replaying a stage whole would skip that rewrite and hand the decoder the tensor from
    before it."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.stage2 = nn.Sequential(nn.ReLU(inplace=True), nn.MaxPool2d(2),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.stage3 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1))
        self.alias = nn.Identity()  # returns its input itself: a replay must too
        self.up = nn.Conv2d(16, 8, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        y = self.stage3(s2)
        y = self.up(torch.cat([y, s2], 1))
        y = torch.nn.functional.interpolate(y, size=s1.shape[2:])
        a = self.alias(s1)
        a.mul_(0.5)  # rewrites s1 too, as in the float model
        return self.head(torch.cat([y, s1], 1)).permute(0, 2, 3, 1)


def test_replay_inputs_rewritten_in_place() -> None:
    torch.manual_seed(0)
    model = _UNet().eval()
    for bn in (model.stage1[1], model.stage2[3]):  # non-trivial statistics: pre- and
        bn.running_mean.normal_()                  # post-ReLU tensors differ
    batches = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    _check_exact(model, batches, ["stage1.0", "stage2.2", "stage3.1", "up", "head"])


class _Rescale(nn.Module):
    """Rewrites a tensor it reaches through an attribute, not through its arguments: the
    trace cannot see that, so only the self-check can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.side: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.side is not None
        self.side.mul_(0.5)
        return self.conv(x)


class _Sneaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = _Rescale()
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        self.mid.side = s
        y = self.mid(s.clone())
        self.mid.side = None
        return self.head(torch.cat([y, s], 1)).flatten(1)


def test_replay_self_check_turns_replay_off(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _Sneaky().eval()
    batches = [torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)]
    objective = Objective(batches)
    objective.prepare(model, CPU)
    names = ["stem", "mid.conv", "head"]
    with caplog.at_level("WARNING", logger="mpsearch._replay"), \
            PrefixReplay(model, objective, CPU, names) as replay:
        replay.record()
        assert not replay.exact
        assert "does not reproduce a full pass" in caplog.text
        w = model.head.weight
        changed = {"head": w + 0.05 * torch.randn_like(w)}
        before = replay.passes
        fast = replay.losses(changed)
        assert replay.passes - before == 1.0  # a full pass, not a replay
        assert np.allclose(fast, replay.losses(changed, replay=False), rtol=1e-6, atol=0)


def test_replay_self_check_passes_quietly(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = _UNet().eval()
    objective = Objective([torch.randn(2, 3, 8, 8) for _ in range(4)])
    objective.prepare(model, CPU)
    with caplog.at_level("WARNING"), \
            PrefixReplay(model, objective, CPU, ["stage1.0", "stage3.1", "head"]) as replay:
        replay.record()
        assert replay.exact
        assert 1.0 < replay.passes < 1.75  # three checks on one batch in four
    assert not caplog.records


class _Branchy(nn.Module):
    """Data-dependent control flow: the trace (batch 0) sees ``block`` called once, a
    larger batch calls it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.stem(x))
        if x.shape[0] > 2:
            h = self.block(h)
        return self.head(h)


def test_replay_data_dependent_calls() -> None:
    torch.manual_seed(0)
    model = _Branchy().eval()
    _check_exact(model, [torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4)],
                 ["stem", "block.0", "head"])


def test_replay_tied_weights_recompute_everything() -> None:
    torch.manual_seed(0)
    model = _Tied().eval()
    batches = [torch.randint(0, 20, (3, 5))]
    _check_exact(model, batches, ["mid", "out"])


def test_replay_attention_out_proj_that_never_runs_itself() -> None:
    torch.manual_seed(0)
    model = _Encoder().eval()
    batches = [torch.randint(0, 30, (3, 6)), torch.randint(0, 30, (2, 6))]
    _check_exact(model, batches, ["enc.layers.0.self_attn.out_proj", "enc.layers.0.linear2",
                                  "enc.layers.1.self_attn.out_proj", "head"])


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(6, 8)
        self.rnn = nn.LSTM(8, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(torch.tanh(self.pre(x)))[0])


def test_replay_recurrent_weights() -> None:
    torch.manual_seed(0)
    model = _Recurrent().eval()
    batches = [torch.randn(3, 5, 6), torch.randn(2, 5, 6)]
    _check_exact(model, batches, ["pre", "rnn.weight_ih_l0", "rnn.weight_hh_l1_reverse",
                                  "head"])


def test_replay_skips_prefix(mnist_dwsep, mnist_calib) -> None:  # type: ignore[no-untyped-def]
    objective = Objective([x for x, _ in mnist_calib[:2]])
    objective.prepare(mnist_dwsep, CPU)
    names = ["stem.0", "blocks.3.pw.0", "classifier"]
    with PrefixReplay(mnist_dwsep, objective, CPU, names) as replay:
        replay.record()
        assert replay.skipped_fraction("stem.0") < 0.1
        assert replay.skipped_fraction("classifier") > 0.8
        # The work clock: a record is a whole pass, a probe the share it recomputes; the
        # first record's self-check replays batch 0 (of 2) from each of the three layers.
        check = sum(1.0 - replay.skipped_fraction(n) for n in names) / 2
        assert replay.exact
        assert replay.passes == pytest.approx(1.0 + check)
        replay.losses({"classifier": dict(mnist_dwsep.named_modules())["classifier"].weight})
        assert replay.passes == pytest.approx(2.0 + check - replay.skipped_fraction("classifier"))
        replay.losses({"stem.0": dict(mnist_dwsep.named_modules())["stem.0"].weight},
                      replay=False)
        assert replay.passes == pytest.approx(3.0 + check - replay.skipped_fraction("classifier"))
        replay.record()  # later records are not checked again
        assert replay.passes == pytest.approx(4.0 + check - replay.skipped_fraction("classifier"))
    _check_exact(mnist_dwsep, [x for x, _ in mnist_calib[:2]], names)


def test_replay_minilm(minilm) -> None:  # type: ignore[no-untyped-def]
    from mpsearch.zoo.minilm import text_batches

    model, tokenizer = minilm
    batches = text_batches(tokenizer, n_batches=2, batch_size=2, max_length=16)
    _check_exact(model, batches, ["encoder.layer.0.attention.self.query",
                                  "encoder.layer.5.output.dense"])


def test_replay_rejects_untraced_layer() -> None:
    model = _ResNet().eval()
    objective = Objective([torch.randn(2, 3, 8, 8) for _ in range(4)])
    objective.prepare(model, CPU)
    with PrefixReplay(model, objective, CPU, ["head"]) as replay:
        replay.record()
        with pytest.raises(ValueError, match="not traced"):
            replay.losses({"nope": torch.zeros(1)})


def _tiny_hf(arch: str) -> tuple[nn.Module, list]:  # type: ignore[type-arg]
    tf = pytest.importorskip("transformers")

    def ids(n: int = 2, t: int = 10) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, 100, (n, t)),
                "attention_mask": torch.ones(n, t, dtype=torch.long)}

    if arch == "gpt2":  # Conv1D layers, lm_head tied to the token embedding
        return (tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100)),
                [ids(), ids(3)])
    if arch == "t5":  # encoder-decoder, relative position bias shared across layers
        cfg = tf.T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=100)
        return (tf.T5ForConditionalGeneration(cfg),
                [{**ids(), "decoder_input_ids": torch.randint(0, 100, (2, 5))}] * 2)
    cfg = tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                        num_heads=[2, 2], window_size=4)  # windows, shifted and merged
    return tf.SwinModel(cfg), [torch.randn(2, 3, 32, 32), torch.randn(1, 3, 32, 32)]


@pytest.mark.parametrize("arch", ["gpt2", "t5", "swin"])
def test_replay_exact_on_transformers(arch: str) -> None:
    from mpsearch.layers import discover

    torch.manual_seed(0)
    model, batches = _tiny_hf(arch)
    model.eval()
    names = [info.name for info in discover(model, batches[0])]
    _check_exact(model, batches, names[::3] + [names[-1]])


def test_per_sample_losses_give_back_each_loss() -> None:
    """Per-sample values weighted by their share are the batch loss: KL over masked token
    positions (sequences of unequal length), hidden-state MSE, and cross-entropy with
    ignored targets; a time-major output (leading dimension not the samples) and a custom
    loss do not split."""
    g = torch.Generator().manual_seed(0)
    ref, out = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[0, :2] = -100
    for kind in ("kl", "mse", "cross_entropy"):
        objective = Objective([torch.zeros(3, 2)])
        objective.kind, objective._refs = kind, [ref]
        m = None if kind == "cross_entropy" else mask
        whole = float(objective.loss_of_output(out, 0, torch.zeros(3, 2), targets, m))
        values, weights = objective.sample_losses(out, 0, targets, m, rows=3)
        assert values.shape == weights.shape == (3,)
        assert weights.sum() == pytest.approx(1.0)
        assert float(values @ weights) == pytest.approx(whole, rel=1e-6)
        if kind != "mse":  # positions counted: 3, 5 and 1 tokens; 3, 5 and 5 targets
            share = [3, 5, 1] if kind == "kl" else [3, 5, 5]
            assert weights == pytest.approx(np.array(share) / sum(share))
        objective._refs = [ref.transpose(0, 1)]
        assert objective.sample_losses(out.transpose(0, 1), 0, targets, None, rows=3) is None
    objective = Objective([torch.zeros(3, 2)], lambda o, b: o.sum())
    objective.kind = "custom"
    assert objective.sample_losses(out, 0, None, None, rows=3) is None


def test_mean_and_stderr_known_answers() -> None:
    from mpsearch.losses import mean_and_stderr

    v = np.array([1.0, 2.0, 3.0, 4.0])
    assert mean_and_stderr(v, np.full(4, 0.25)) == pytest.approx((2.5, np.std(v, ddof=1) / 2))
    # two batches of 1 and 3 samples, each batch half of the mean: weights 1/2, 1/6 x 3
    w = np.array([0.5, 1 / 6, 1 / 6, 1 / 6])
    mean = 0.5 * 1 + (2 + 3 + 4) / 6
    var = float(w @ (v - mean) ** 2) / (1 - w @ w)
    assert mean_and_stderr(v, w) == pytest.approx((mean, np.sqrt(var * (w @ w))))
    # one sample: no error estimate (it read 0, certainty, in a table's stderr column)
    assert mean_and_stderr(np.array([5.0]), np.array([1.0])) == (5.0, math.inf)


def test_replay_sample_losses_over_batches() -> None:
    """Each batch counts 1/B of the mean, its samples by their share; the reference's
    samples come back with a call that changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    batches = [torch.randn(2, 4), torch.randn(6, 4)]
    objective = Objective(batches)
    objective.prepare(model, CPU)
    replay = PrefixReplay(model, objective, CPU, ["0", "2"])
    assert replay.sample_losses() is None  # not asked for
    replay.per_sample = True
    with replay:
        replay.record()
        values, weights = replay.sample_losses()
        assert values == pytest.approx(np.zeros(8), abs=1e-7)
        assert weights == pytest.approx([0.25] * 2 + [1 / 12] * 6)
        per_batch = replay.losses({"2": model[2].weight * 1.5})
        values, weights = replay.sample_losses()
        assert float(values @ weights) == pytest.approx(per_batch.mean(), rel=1e-6)
        replay.losses({})
        assert replay.sample_losses()[0] == pytest.approx(np.zeros(8), abs=1e-7)


def test_sequence_first_models_do_not_split_by_sample() -> None:
    """A GRU with ``batch_first=False`` reads (time, batch, features): the leading
    dimension is time, so its loss is not split by sample and qerror's standard error is
    over batches."""
    from mpsearch.layers import discover, quantizable_modules
    from mpsearch.quant import QuantConfig
    from mpsearch.sensitivity import QError

    class _TimeMajor(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0])  # (time, batch, classes)

    torch.manual_seed(0)
    model = _TimeMajor().eval()
    batches = [torch.randn(6, 6, 4) for _ in range(3)]  # time == batch: shapes cannot tell
    objective = Objective(batches)
    objective.prepare(model, CPU)
    assert not objective.batch_first
    out = model(batches[0])
    assert objective.sample_losses(out, 0, None, None, rows=6) is None
    layers = discover(model, batches[0])
    table = QError().estimate(model, quantizable_modules(model), layers, objective, (2, 8),
                              QuantConfig(), device=CPU)
    base = [float(objective.loss(model, i, CPU)) for i in range(3)]
    import copy

    from mpsearch.quant.apply import quantize_weight
    q = copy.deepcopy(model)
    with torch.no_grad():
        q.head.weight.copy_(quantize_weight(q.head.weight, "Linear", 2, QuantConfig()))
    delta = np.array([float(objective.loss(q, i, CPU)) - base[i] for i in range(3)])
    row = [info.name for info in layers].index("head")
    assert table.omega[row, 0] == pytest.approx(delta.mean(), rel=1e-4)
    assert table.omega_stderr[row, 0] == pytest.approx(delta.std(ddof=1) / np.sqrt(3), rel=1e-3)


def test_replay_keeps_a_users_forward_hook_that_changes_an_output(
        caplog: pytest.LogCaptureFixture) -> None:
    """The store held a module's output after the user's hooks, which ran again on the
    replayed value (x2 twice): the self-check turned replay off and blamed the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 5)).eval()
    model[2].register_forward_hook(lambda _m, _i, out: out * 2.0)
    batches = [torch.randn(16, 8) for _ in range(3)]
    with caplog.at_level("WARNING"):
        _check_exact(model, batches, ["0", "2", "4"])
        objective = Objective(batches)
        objective.prepare(model, CPU)
        with PrefixReplay(model, objective, CPU, ["0", "2", "4"]) as replay:
            replay.record()
            assert replay.exact
    assert not caplog.records
