"""The command line: every subcommand end to end on the real MNIST CNN, exit codes, --json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpsearch import BitMap, quantize
from mpsearch.cli import build_parser, main
from mpsearch.search import AUTO_SLICES

MODEL = ["--model", "mpsearch.zoo.mnist:pretrained_mnist", "--model-args", '{"arch": "cnn"}']
CALIB = ["--data", "mpsearch.zoo.mnist:mnist_batches",
         "--data-args", '{"split": "calib", "n_batches": 2}']


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """One real search through the CLI (few probes: the CLI is under test, not the search)."""
    import os

    os.environ.setdefault("MPSEARCH_CACHE", str(model_cache))
    path = tmp_path_factory.mktemp("cli") / "bitmap.json"
    code = main(["search", *MODEL, *CALIB, "--avg-bits", "4", "--max-probes", "4",
                 "--slices", "none", "--out", str(path), "--json", "-q"])
    assert code == 0
    return path


@pytest.mark.parametrize("command", ["search", "apply", "validate", "export", "import", "demo"])
def test_every_subcommand_has_help(command, capsys):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: mpsearch {command}")
    assert "--json" in out and "--quiet" in out


def test_usage_errors_exit_2_and_errors_exit_1(capsys, tmp_path):
    assert run(capsys, "bogus")[0] == 2
    assert run(capsys, "search", "--avg-bits", "4")[0] == 2  # --model/--data missing
    code, _, err = run(capsys, "validate", "--model", "no_colon", "--data", "x:y",
                       "--bitmap", "b.json")
    assert code == 1 and "package.module:function" in err
    code, _, err = run(capsys, "export", "--bitmap", str(tmp_path / "none.json"), "--to", "hawq")
    assert code == 1 and "none.json" in err
    code, _, err = run(capsys, "export", "--bitmap", str(tmp_path / "none.json"))
    assert code == 2 and "--to" in err  # a usage error, as argparse's own
    code, _, err = run(capsys, "search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib")
    assert code == 2 and "mpsearch search: error: give a budget" in err
    code, _, err = run(capsys, "search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib",
                       "--avg-bits", "4", "--threads", "0")
    assert code == 2 and "--threads must be at least 1" in err


def test_zoo_names_take_no_arguments_and_a_wrong_one_lists_the_zoo(capsys):
    """--model-args/--data-args with a zoo: name were ignored, even malformed JSON, and
    zoo:nope said "cannot import 'zoo'"."""
    base = ["search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--avg-bits", "3"]
    code, _, err = run(capsys, *base, "--model-args", "{bad")
    assert code == 1 and "--model-args is for a package.module:function --model; zoo:cnn " \
        "takes no arguments" in err
    code, _, err = run(capsys, *base, "--data-args", '{"n": 1}')
    assert code == 1 and "zoo:mnist-calib takes no arguments" in err
    code, _, err = run(capsys, "search", "--model", "zoo:nope", "--data", "zoo:mnist-calib",
                       "--avg-bits", "3")
    assert code == 1 and "--model zoo:nope: no such zoo entry; known: zoo:cnn, " in err


def test_infeasible_budget_is_an_error_stating_the_minimum(capsys):
    code, _, err = run(capsys, "search", *MODEL, *CALIB, "--avg-bits", "1.5", "-q")
    assert code == 1
    assert "infeasible budget" in err and "2" in err


def test_search_writes_the_map_it_reports(searched):
    bitmap = BitMap.load(searched)
    assert bitmap.avg_bits() <= 4.0 + 1e-9
    assert set(bitmap) == {"features.0", "features.3", "classifier.0", "classifier.2"}


def test_search_json_is_one_object(capsys, tmp_path, model_cache):
    out_path = tmp_path / "b.json"
    code, out, _ = run(capsys, "search", "--model", "zoo:cnn", *CALIB, "--avg-bits", "5",
                       "--max-probes", "2", "--out", str(out_path), "--json", "-q")
    doc = json.loads(out)
    assert code == 0 and doc["bitmap"] == str(out_path) and doc["status"] == "optimal"
    assert doc["bits"] == BitMap.load(out_path).bits()
    # --slices auto: one layer holds 97 %
    assert doc["slices"]["classifier.0"] == AUTO_SLICES
    ref = doc["refinement"]  # on by default; measured, never worse than the solver's map
    assert ref["measured_after"] <= ref["measured_before"]
    assert ref["stopped_by"] in ("converged", "max_passes") and ref["passes"] > 0
    assert 1 <= ref["uniform_samples"] <= ref["samples"] == 200  # two batches of 100
    # avg bits 5: the best uniform map within the budget is INT5, measured beside the map
    assert ref["uniform_bits"] == 5
    assert ref["uniform_ratio"] == pytest.approx(ref["uniform_measured"] / ref["measured_after"])
    assert doc["predicted"]["calibration_uniform_loss_increase"] == ref["uniform_measured"]


def test_search_text_says_the_loss_and_the_samples_behind_the_gain(capsys, tmp_path,
                                                                   model_cache):
    code, out, _ = run(capsys, "search", "--model", "zoo:cnn", *CALIB, "--avg-bits", "4",
                       "--sensitivity", "fisher", "--slices", "none",
                       "--out", str(tmp_path / "b.json"), "-q")
    assert code == 0
    assert "loss: KL divergence of the output from the float model's" in out
    assert "against uniform INT4 within the budget" in out
    assert "of the 200 calibration samples" in out


@pytest.mark.parametrize("fmt", ["mpsearch", "hawq", "gptqmodel", "compressed-tensors",
                                 "torchao", "hqq"])
def test_export_then_import_round_trips(fmt, searched, capsys, tmp_path):
    out = tmp_path / f"map.{fmt}"
    code, stdout, _ = run(capsys, "export", "--bitmap", str(searched), "--to", fmt,
                            "--out", str(out), "-q")
    assert code == 0 and out.exists() and "wrote" in stdout
    bitmap = BitMap.load(searched)
    if fmt in ("mpsearch", "hawq", "gptqmodel"):
        back = tmp_path / "back.json"
        code, stdout, _ = run(capsys, "import", "--from", fmt, "--input", str(out), *MODEL,
                              "--out", str(back), "--json", "-q")
        assert code == 0
        widened = {5: 8, 6: 8, 7: 8} if fmt == "gptqmodel" else {}  # GPTQ: 2, 3, 4, 8
        assert json.loads(stdout)["bits"] == {n: widened.get(b, b)
                                              for n, b in bitmap.bits().items()}


def test_export_to_stdout_and_json_carry_warnings(searched, capsys, tmp_path):
    code, out, _ = run(capsys, "export", "--bitmap", str(searched), "--to", "hawq", "-q")
    assert code == 0 and json.loads(out) == BitMap.load(searched).bits()
    code, out, _ = run(capsys, "export", "--bitmap", str(searched), "--to", "torchao",
                       "--json", "-q")
    doc = json.loads(out)
    assert doc["format"] == "torchao" and any("Linear only" in w for w in doc["warnings"])
    code, _, err = run(capsys, "export", "--bitmap", str(searched), "--to", "llamacpp",
                       "--set", "names={\"features.0\": \"blk.0.attn_q\"}", "strict=false",
                       "-q")
    assert code == 0 and "no GGUF name" in err


def test_apply_state_dict_is_the_quantized_model(searched, capsys, tmp_path, mnist_cnn):
    out = tmp_path / "q.pt"
    code, _, _ = run(capsys, "apply", *MODEL, "--bitmap", str(searched), "--out", str(out),
                     "-q")
    assert code == 0
    saved = torch.load(out, weights_only=True)
    want = quantize(mnist_cnn, BitMap.load(searched)).state_dict()
    assert saved.keys() == want.keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)


def test_apply_onnx_qdq_stores_the_maps_bits_and_exports_overrides(searched, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "q.onnx"
    code, stdout, _ = run(capsys, "apply", *MODEL, *CALIB, "--bitmap", str(searched),
                          "--format", "onnx-qdq", "--calib-batches", "1", "--out", str(out),
                          "--json", "-q")
    doc = json.loads(stdout)
    bitmap = BitMap.load(searched)
    assert code == 0 and out.exists()
    assert {n: s["bits"] for n, s in doc["stored"].items()} == {
        n: 4 if b <= 4 else 8 for n, b in bitmap.bits().items()}
    overrides = tmp_path / "ort.json"
    code, _, _ = run(capsys, "export", "--bitmap", str(searched), "--to", "onnxruntime",
                     "--onnx-model", doc["float_onnx"], "--out", str(overrides), "-q")
    kwargs = json.loads(overrides.read_text())
    assert code == 0 and set(kwargs) == {"extra_options", "nodes_to_exclude", "nodes_to_quantize"}
    weights = [t for t in kwargs["extra_options"]["TensorQuantOverrides"] if t.endswith("weight")]
    assert len(weights) == 4


def test_validate_json(searched, capsys):
    evals = ["--data", "mpsearch.zoo.mnist:mnist_batches", "--data-args",
             '{"split": "eval", "n_batches": 1}']
    code, out, _ = run(capsys, "validate", *MODEL, *evals, "--bitmap", str(searched),
                       "--json", "-q")
    doc = json.loads(out)
    assert code == 0 and 0.5 < doc["accuracy_quantized"] <= 1.0


def test_parser_lists_the_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"search", "demo", "profile", "apply", "validate", "export",
                                "import"}


def test_module_entry_point_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "mpsearch.cli", "export", "--list", "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" in json.loads(proc.stdout)


def test_profile_then_latency_budgeted_search(tmp_path):  # type: ignore[no-untyped-def]
    prof = tmp_path / "prof.json"
    assert main(["profile", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--rounds", "1",
                 "--out", str(prof), "-q"]) == 0
    doc = json.loads(prof.read_text())
    assert doc and prof.stat().st_size > 100
    out = tmp_path / "bm.json"
    assert main(["search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--profile",
                 str(prof), "--latency-ratio", "1.5", "--sensitivity", "fisher",
                 "--save-sensitivity", str(tmp_path / "t.json"), "--refine", "off",
                 "--out", str(out), "-q"]) == 0
    import mpsearch

    bm = mpsearch.BitMap.load(out)
    assert "latency_us" in bm.predicted
    # the saved table is reused: only the solve runs
    assert main(["search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--avg-bits",
                 "3", "--sensitivity", str(tmp_path / "t.json"), "--refine", "off",
                 "--out", str(out), "-q"]) == 0
    assert mpsearch.BitMap.load(out).avg_bits() <= 3.0


def test_search_loss_option(tmp_path):  # type: ignore[no-untyped-def]
    import mpsearch

    table = tmp_path / "t.json"
    base = ["search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--avg-bits", "4",
            "--sensitivity", "fisher", "--refine", "off", "--out", str(tmp_path / "bm.json"),
            "--save-sensitivity", str(table), "--slices", "none", "-q"]
    assert main(base) == 0
    assert mpsearch.SensitivityTable.load(table).data_fingerprint.endswith(":kl")
    assert main([*base, "--loss", "task"]) == 0
    assert mpsearch.SensitivityTable.load(table).data_fingerprint.endswith(":cross_entropy")


@pytest.mark.parametrize(("spec", "n", "shape"), [
    ("zoo:photos-calib", 4, (8, 3, 224, 224)),
    ("zoo:lines-eval", 8, (8, 1, 64, 384)),
    ("zoo:scenes-calib", 4, (8, 3, 128, 128)),
])
def test_zoo_data_names(spec: str, n: int, shape: tuple[int, ...]) -> None:
    pytest.importorskip("skimage")
    pytest.importorskip("easyocr_en_models")
    from mpsearch.cli._common import load_data

    batches = load_data(build_parser().parse_args(
        ["search", "--model", "zoo:craft", "--data", spec, "--avg-bits", "4"]))
    assert len(batches) == n and tuple(batches[0].shape) == shape


def test_search_a_real_detector_by_zoo_name(capsys, tmp_path):
    # EasyOCR's CRAFT (a U-net) on photos with text, from the command line alone.
    pytest.importorskip("skimage")
    pytest.importorskip("easyocr_en_models")
    out_path = tmp_path / "craft.json"
    code, out, err = run(capsys, "search", "--model", "zoo:craft", "--data", "zoo:scenes-calib",
                         "--avg-bits", "4", "--sensitivity", "fisher_block",
                         "--refine", "off", "--out", str(out_path), "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["bits"]) == 27 and BitMap.load(out_path).avg_bits() <= 4.0 + 1e-9


def test_zoo_face_classifier_by_name(capsys, tmp_path):
    pytest.importorskip("skimage")
    if importlib.util.find_spec("facenet_pytorch") is None:  # never imported: needs torchvision
        pytest.skip("needs facenet-pytorch (--no-deps)")
    from mpsearch.cli._common import load_data

    batches = load_data(build_parser().parse_args(
        ["search", "--model", "zoo:onet", "--data", "zoo:faces-eval", "--avg-bits", "4"]))
    assert len(batches) == 9 and tuple(batches[0][0].shape) == (16, 3, 48, 48)
    code, out, err = run(capsys, "search", "--model", "zoo:onet", "--data", "zoo:faces-calib",
                         "--avg-bits", "4", "--refine", "off", "--json", "-q", "--slices",
                         "none", "--out", str(tmp_path / "onet.json"))
    assert code == 0, err
    assert set(json.loads(out)["bits"]) == {"conv1", "conv2", "conv3", "conv4", "dense5",
                                            "dense6_1"}


def test_sliced_search_then_apply_and_validate(capsys, tmp_path, mnist_cnn):  # type: ignore[no-untyped-def]
    import mpsearch

    path = tmp_path / "sliced.json"
    assert main(["search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--avg-bits", "4",
                 "--sensitivity", "fisher", "--refine", "off", "--slices", "4",
                 "--out", str(path), "-q"]) == 0
    bitmap = BitMap.load(path)
    assert bitmap.slices is not None and "classifier.0.parts.3" in bitmap
    out = tmp_path / "q.pt"
    assert run(capsys, "apply", "--model", "zoo:cnn", "--bitmap", str(path), "--out", str(out),
               "-q")[0] == 0
    saved = torch.load(out, weights_only=True)
    # the original structure, each channel at its slice's width: loads into the model
    want = mpsearch.merge_slices(quantize(mnist_cnn, bitmap)).state_dict()
    assert saved.keys() == want.keys() == mnist_cnn.state_dict().keys()
    assert all(torch.equal(saved[k], want[k]) for k in want)
    code, out_text, _ = run(capsys, "validate", "--model", "zoo:cnn", "--data", "zoo:mnist-eval",
                            "--bitmap", str(path), "--json")
    assert code == 0 and json.loads(out_text)["avg_bits"] <= 4.0
    code, _, err = run(capsys, "export", "--bitmap", str(path), "--to", "llamacpp")
    assert code == 1 and "one width per tensor" in err


def test_slices_option_takes_a_count_auto_or_none(capsys) -> None:  # type: ignore[no-untyped-def]
    parse = build_parser().parse_args
    base = ["search", "--model", "zoo:cnn", "--data", "zoo:mnist-calib", "--avg-bits", "4"]
    assert parse(base).slices == "auto"
    assert parse([*base, "--slices", "none"]).slices is None
    assert parse([*base, "--slices", "Auto"]).slices == "auto"
    assert parse([*base, "--slices", "8"]).slices == 8
    for bad in ("1", "x", "2.5"):
        with pytest.raises(SystemExit):
            parse([*base, "--slices", bad])
        assert "expected an integer >= 2, 'auto' or 'none'" in capsys.readouterr().err


def test_a_model_that_fails_on_the_data_is_one_line_not_a_traceback(capsys):
    # the MNIST CNN fed the text batches of MiniLM's tokenizer would need the hf extra;
    # integer images from a loader in the test module fail the same way: in the model
    code, _, err = run(capsys, "search", *MODEL, "--data", "tests.test_cli:integer_digits",
                       "--avg-bits", "4", "-q")
    assert code == 1
    assert err.startswith("mpsearch: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "-v prints the traceback" in err


def integer_digits() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Real digits as 0-255 integers, which a float model cannot take."""
    from mpsearch.zoo.mnist import mnist_batches

    return [((x * 255).long(), y) for x, y in mnist_batches("calib", n_batches=1)]


def test_models_load_from_the_working_directory_and_from_a_saved_file(
        capsys, tmp_path, monkeypatch, mnist_cnn):  # type: ignore[no-untyped-def]
    (tmp_path / "my_models.py").write_text(
        "from mpsearch.zoo.mnist import pretrained_mnist\n"
        "def cnn():\n    return pretrained_mnist('cnn')\n")
    torch.save(mnist_cnn, tmp_path / "whole.pt")
    torch.save(mnist_cnn.state_dict(), tmp_path / "state.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for model in ("my_models:cnn", "whole.pt"):
        code, out, err = run(capsys, "search", "--model", model, *CALIB, "--avg-bits", "4",
                             "--sensitivity", "fisher", "--slices", "none", "--json", "-q",
                             "--out", f"{model.replace(':', '_')}.json")
        assert code == 0, err
        assert json.loads(out)["avg_bits"] <= 4.0 + 1e-9
    code, _, err = run(capsys, "search", "--model", "state.pt", *CALIB, "--avg-bits", "4")
    assert code == 1 and "state_dict, not a model" in err
    code, _, err = run(capsys, "search", "--model", "nowhere.pt", *CALIB, "--avg-bits", "4")
    assert code == 1 and "nowhere.pt" in err
    # a bad --model names the zoo's models, not its data
    code, _, err = run(capsys, "search", "--model", "cnn", *CALIB, "--avg-bits", "4")
    assert code == 1 and "zoo:cnn" in err and "zoo:mnist-calib" not in err


def test_user_errors_of_profile_and_export_are_one_line(capsys, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """A loader of no batches (profile raised StopIteration) and an --onnx-model that is
    not ONNX (protobuf's DecodeError / ParseError) were tracebacks."""
    from torch import nn

    (tmp_path / "loaders.py").write_text("def empty():\n    return []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code, _, err = run(capsys, "profile", "--model", "zoo:cnn", "--data", "loaders:empty",
                       "-q", "--out", "p.json")
    assert code == 1 and "--data loaders:empty gave no batches" in err
    assert "Traceback" not in err
    BitMap.uniform(nn.Sequential(nn.Linear(8, 8)), 4).save(tmp_path / "u4.json")
    (tmp_path / "garbage.onnx").write_text("garbage\n")
    for bad in ("garbage.onnx", "u4.json"):
        code, _, err = run(capsys, "export", "--bitmap", "u4.json", "--to", "onnxruntime",
                           "--onnx-model", bad, "-q")
        assert code == 1 and f"{bad} is not an ONNX model" in err, err
        assert "Traceback" not in err
    # --out a folder: said before the search, naming it (it named a temp file after)
    code, _, err = run(capsys, "search", *MODEL, *CALIB, "--avg-bits", "4", "--out",
                       str(tmp_path), "-q")
    assert code == 1 and f"--out {tmp_path} is a folder" in err
    code, _, err = run(capsys, "search", *MODEL, *CALIB, "--avg-bits", "4", "--sensitivity",
                       "hutchinson", "--max-probes", "1", "-q")
    assert code == 2 and "--max-probes: expected an integer >= 2" in err


def test_apply_takes_its_format_from_an_onnx_name(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """apply --out q.onnx without --format wrote a torch state_dict into q.onnx (exit 0)."""
    onnx = pytest.importorskip("onnx")
    bitmap = tmp_path / "u4.json"
    from mpsearch.zoo.mnist import pretrained_mnist

    BitMap.uniform(pretrained_mnist("cnn"), 4).save(bitmap)
    out = tmp_path / "q.onnx"
    code, _, err = run(capsys, "apply", "--model", "zoo:cnn", "--bitmap", str(bitmap),
                       "--out", str(out), "-q")
    assert code == 1 and "--format onnx (from --out .onnx) needs --data" in err
    code, _, err = run(capsys, "apply", "--model", "zoo:cnn", "--data", "zoo:mnist-calib",
                       "--bitmap", str(bitmap), "--out", str(out), "-q")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(str(out)))
    code, _, err = run(capsys, "apply", "--model", "zoo:cnn", "--bitmap", str(bitmap),
                       "--format", "state_dict", "--out", str(out), "-q")
    assert code == 1 and "--format state_dict writes a torch file, not ONNX" in err
