"""Bit map: construction, JSON round-trip, rejection of bad files, fitting a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import mpsearch
from mpsearch import BitMap, BitMapError, LayerEntry, QuantConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def test_uniform_and_from_bits() -> None:
    model = _model()
    bm = BitMap.uniform(model, 4)
    assert set(bm) == {"0", "3"} and bm["0"].w_bits == 4 and bm["3"].a_bits is None
    assert bm.avg_bits() == pytest.approx(4.0)
    bm2 = BitMap.from_bits(model, {"0": 8}, default=2)
    assert bm2.bits() == {"0": 8, "3": 2}
    assert bm2.avg_bits() == pytest.approx((36 * 8 + 1440 * 2) / 1476)
    with pytest.raises(ValueError, match="not quantizable"):
        BitMap.from_bits(model, {"1": 8}, default=4)
    with pytest.raises(ValueError, match="default"):
        BitMap.from_bits(model, {"0": 8})
    excluded = BitMap.uniform(model, 4, exclude="0")
    assert excluded.bits() == {"0": 32, "3": 4}  # excluded layers stay float


def test_json_round_trip(tmp_path: Path) -> None:
    model = _model()
    qc = QuantConfig(granularity="group", group_size=16, symmetric=True, range_method="minmax")
    bm = BitMap.from_bits(model, {"0": 8, "3": 3}, a_bits=8, qconfig=qc)
    path = bm.save(tmp_path / "sub" / "bm.json")
    text = path.read_text()
    assert json.loads(text)["format_version"] == 1
    back = BitMap.load(path)
    assert back.to_dict() == bm.to_dict()
    assert back["3"].qconfig == qc and back["3"].a_bits == 8 and back["3"].shape == (10, 144)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format="other"), "not an mpsearch bit map"),
    (lambda d: d.update(format_version=2), "unknown format_version 2"),
    (lambda d: d.update(format_version=True), "unknown format_version True"),
    (lambda d: d.update(layers={}), "non-empty"),
    (lambda d: d["layers"]["0"].update(w_bits=1), "w_bits"),
    (lambda d: d["layers"]["0"].update(w_bits="4"), "w_bits"),
    (lambda d: d["layers"]["0"].update(a_bits=9), "a_bits"),
    (lambda d: d["layers"]["0"].update(granularity="row"), "granularity"),
    (lambda d: d["layers"]["0"].update(bogus=1), "unknown key"),
    (lambda d: d["layers"]["0"].pop("w_bits"), "missing 'w_bits'"),
    (lambda d: d["layers"]["0"].update(shape="3x3"), "shape"),
    (lambda d: d.update(extra=1), "unknown top-level"),
    (lambda d: d.update(budget=[1]), "'budget'"),
])
def test_bad_documents_rejected(mutate, match) -> None:  # type: ignore[no-untyped-def]
    doc = BitMap.uniform(_model(), 4).to_dict()
    mutate(doc)
    with pytest.raises(BitMapError, match=match):
        BitMap.from_dict(doc)


def test_malformed_json_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "mpsearch.bitmap", ')
    with pytest.raises(BitMapError, match=r"bad.json: malformed JSON at line 1"):
        BitMap.load(bad)
    assert isinstance(BitMapError("x"), ValueError)


def test_bitmap_that_does_not_fit_names_layers() -> None:
    bm = BitMap.uniform(_model(), 4)
    other = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10),
                          nn.Linear(10, 2))
    with pytest.raises(BitMapError, match=r"not in the bit map: \['4'\].*shape or kind changed: \['0 "):
        mpsearch.quantize(other, bm)


def test_entry_validation() -> None:
    with pytest.raises(ValueError):
        LayerEntry(w_bits=9)
    with pytest.raises(ValueError):
        LayerEntry(w_bits=True)  # type: ignore[arg-type]
    assert LayerEntry(w_bits=16).w_bits == 16


def test_a_bitmap_whose_layer_kind_changed_does_not_fit() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    doc = BitMap.uniform(model, 4).to_dict()
    doc["layers"]["0"]["kind"] = "Linear"
    with pytest.raises(BitMapError, match=r"kind changed: \['0 \(bit map Linear, model Conv2d\)"):
        BitMap.from_dict(doc).check_model(model)


def test_whole_number_float_bits_are_read_as_ints() -> None:
    from mpsearch.bitmap import LayerEntry

    entry = LayerEntry(w_bits=4.0, a_bits=8.0)  # type: ignore[arg-type]
    assert type(entry.w_bits) is int and entry.w_bits == 4
    assert type(entry.a_bits) is int and entry.a_bits == 8
    with pytest.raises(ValueError, match="w_bits"):
        LayerEntry(w_bits=4.5)  # type: ignore[arg-type]


def test_written_files_take_the_umask_and_a_folder_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Files were written 0600 (mkstemp's private mode) whatever the umask, and a folder
    given as the path failed naming a temp file."""
    import os
    import stat

    from torch import nn

    from mpsearch.export import write

    bitmap = BitMap.uniform(nn.Sequential(nn.Linear(8, 8)), 4)
    old = os.umask(0o022)
    try:
        written = [bitmap.save(tmp_path / "map.json"),
                   write("hawq", bitmap.export("hawq"), tmp_path / "hawq.json")]
        os.umask(0o077)
        private = bitmap.save(tmp_path / "private.json")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in written] == [0o644, 0o644]
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder"):
        bitmap.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hawq.json", "map.json",
                                                          "private.json"]


def test_non_finite_numbers_are_written_as_null() -> None:
    """One calibration sample has an infinite standard error: the bit map was written with
    the token ``Infinity``, which strict JSON readers (``JSON.parse``) refuse."""
    import json
    import math

    from torch import nn

    bitmap = BitMap.uniform(nn.Sequential(nn.Linear(8, 8)), 4)
    bitmap.predicted.update(loss_increase=0.5, loss_increase_stderr=math.inf)
    bitmap.provenance["ratios"] = [1.0, math.nan]
    text = bitmap.to_json()

    def refuse(token: str) -> None:
        raise ValueError(token)

    doc = json.loads(text, parse_constant=refuse)
    assert doc["predicted"]["loss_increase_stderr"] is None
    assert doc["provenance"]["ratios"] == [1.0, None]
    again = BitMap.from_json(text)
    assert again.predicted["loss_increase"] == 0.5
    assert again.predicted["loss_increase_stderr"] is None
    # a budget must be a number one can meet
    doc["budget"] = {"avg_bits": math.nan}
    with pytest.raises(BitMapError, match="'budget'"):
        BitMap.from_dict(doc)
