"""What every subcommand shares: loading models and data, output, progress, warnings."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Options that do not make a command (a missing budget, ``--to``): exit code 2, as
    argparse's own usage errors."""

# Real models and data that ship with mpsearch's extras, by short name.
ZOO_MODELS = ("zoo:cnn", "zoo:dwsep", "zoo:minilm", "zoo:mobilenet_v2", "zoo:crnn", "zoo:craft",
              "zoo:onet")
ZOO_DATA = ("zoo:mnist-calib", "zoo:mnist-eval", "zoo:text-calib", "zoo:text-eval",
            "zoo:photos-calib", "zoo:photos-eval", "zoo:lines-calib", "zoo:lines-eval",
            "zoo:scenes-calib", "zoo:scenes-eval", "zoo:faces-calib", "zoo:faces-eval")
_cache: dict[str, Any] = {}


def _minilm() -> tuple[Any, Any]:
    if "minilm" not in _cache:
        from mpsearch.zoo.minilm import load_minilm

        _cache["minilm"] = load_minilm()
    model, tok = _cache["minilm"]
    return model, tok


def _zoo_model(name: str, seed: int) -> Any:
    if name in ("cnn", "dwsep"):
        from mpsearch.zoo.mnist import pretrained_mnist

        return pretrained_mnist(name, seed=seed)  # type: ignore[arg-type]
    if name == "mobilenet_v2":
        from mpsearch.zoo.imagenet import load_mobilenet_v2

        return load_mobilenet_v2()
    if name == "crnn":
        from mpsearch.zoo.ocr import load_crnn

        return load_crnn()
    if name == "craft":
        from mpsearch.zoo.craft import load_craft

        return load_craft()
    if name == "onet":
        from mpsearch.zoo.faces import load_onet

        return load_onet()
    return _minilm()[0]


def _zoo_data(name: str, seed: int) -> Any:
    source, split = name.split("-")
    if source == "mnist":
        from mpsearch.zoo.mnist import mnist_batches

        return mnist_batches(split, batch_size=100 if split == "calib" else 250, seed=seed)
    n_batches = 4 if split == "calib" else 8  # 32 calibration / 64 evaluation samples
    if source == "photos":  # ImageNet-normalised 224² crops, for zoo:mobilenet_v2
        from mpsearch.zoo.imagenet import imagenet_batches

        return imagenet_batches(split, batch_size=8, seed=seed)
    if source == "lines":  # rendered text lines, for zoo:crnn
        from mpsearch.zoo.ocr import ocr_batches

        return ocr_batches(split, n_batches=n_batches, batch_size=8)
    if source == "scenes":  # 128² photos with a phrase on a sign, for zoo:craft
        from mpsearch.zoo.craft import scene_batches

        return scene_batches(split, n_batches=n_batches, batch_size=8, seed=seed)
    if source == "faces":  # 48² LFW faces and non-faces (64 calibration / 136), for zoo:onet
        from mpsearch.zoo.faces import face_batches

        return face_batches(split, batch_size=16)
    from mpsearch.zoo.minilm import text_batches

    return text_batches(_minilm()[1], split, n_batches=4, batch_size=8, seed=seed)


def load_object(spec: str, what: str, kwargs: str | None = None) -> Any:
    """Call ``package.module:function`` with the JSON object ``kwargs`` as keyword arguments.

    Raises:
        ValueError: a malformed spec or JSON, or a module that does not import.
        TypeError: a missing or non-callable attribute, or kwargs not a JSON object.
    """
    if ":" not in spec:
        names = ZOO_MODELS if what == "--model" else ZOO_DATA
        saved = ", a .pt file of a whole saved model" if what == "--model" else ""
        raise ValueError(f"{what} must look like package.module:function{saved} (or one of "
                         f"{', '.join(names)}), got {spec!r}")
    try:
        params = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} arguments must be a JSON object, got {kwargs!r}: {exc}") \
            from None
    if not isinstance(params, dict):
        raise TypeError(f"{what} arguments must be a JSON object, got {kwargs!r}")
    module_name, func_name = spec.split(":", 1)
    _importable_here()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {what}: {exc}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise TypeError(f"{module_name} has no callable {func_name!r} for {what}")
    return func(**params)


def _importable_here() -> None:
    """Modules in the working directory import, as with ``python -m``."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _saved_model(path: str) -> Any:
    """A whole model saved with ``torch.save(model, path)`` (its class must import)."""
    import torch

    _importable_here()
    try:
        # a pickled module needs the full unpickler: load only files you trust
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise ValueError(f"cannot load the model saved in {path}: {exc} (its class must "
                         "import from the working directory or the Python path)") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(f"{path} is not a model saved with torch.save(model, path): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                         ) from None


def _no_arguments(spec: str, what: str, kwargs: str | None, zoo: tuple[str, ...]) -> None:
    """A ``zoo:`` name must be one of ``zoo``, and it (or a saved model) takes no
    ``--…-args``: they were ignored, even malformed."""
    if spec.startswith("zoo:") and spec not in zoo:
        raise ValueError(f"{what} {spec}: no such zoo entry; known: {', '.join(zoo)}")
    saved = what == "--model" and spec.endswith((".pt", ".pth")) and ":" not in spec
    if kwargs is not None and (spec in zoo or saved):
        raise ValueError(f"{what}-args is for a package.module:function {what}; "
                         f"{spec} takes no arguments")


def load_model(args: argparse.Namespace) -> Any:
    """The model of ``--model`` (a factory returning ``(model, …)`` gives its first item;
    a ``.pt`` / ``.pth`` file holds a whole model saved with ``torch.save``)."""
    from torch import nn

    spec = args.model
    _no_arguments(spec, "--model", getattr(args, "model_args", None), ZOO_MODELS)
    if spec in ZOO_MODELS:
        return _zoo_model(spec.removeprefix("zoo:"), args.seed)
    if spec.endswith((".pt", ".pth")) and ":" not in spec:
        obj = _saved_model(spec)
        if isinstance(obj, dict):
            raise TypeError(f"{spec} holds a state_dict, not a model: pass a factory "
                            "(package.module:function) that builds the model and loads it")
        if not isinstance(obj, nn.Module):
            raise TypeError(f"{spec} holds a {type(obj).__name__}, not an nn.Module")
        return obj
    obj = load_object(spec, "--model", getattr(args, "model_args", None))
    if isinstance(obj, tuple) and obj and isinstance(obj[0], nn.Module):
        obj = obj[0]
    if not isinstance(obj, nn.Module):
        raise TypeError(f"--model {spec} returned a {type(obj).__name__}, not an nn.Module")
    return obj


def load_data(args: argparse.Namespace, option: str = "data") -> Any:
    """The batches of ``--data``."""
    spec = getattr(args, option)
    _no_arguments(spec, f"--{option}", getattr(args, f"{option}_args", None), ZOO_DATA)
    if spec in ZOO_DATA:
        return _zoo_data(spec.removeprefix("zoo:"), args.seed)
    return load_object(spec, f"--{option}", getattr(args, f"{option}_args", None))


def add_model_args(p: argparse.ArgumentParser, *, data: str | None = "calibration") -> None:
    """``--model`` (+ ``--model-args``) and, unless ``data`` is None, ``--data``."""
    p.add_argument("--model", required=True,
                   help="package.module:factory returning the model (modules in the working "
                        "directory import), a .pt file of a model saved whole with "
                        f"torch.save(model, path), or {'|'.join(ZOO_MODELS)}")
    p.add_argument("--model-args", metavar="JSON", help="keyword arguments of the factory")
    if data is not None:
        p.add_argument("--data", required=True,
                       help=f"package.module:loader returning a list of {data} batches, or "
                            f"{'|'.join(ZOO_DATA)}")
        p.add_argument("--data-args", metavar="JSON", help="keyword arguments of the loader")


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``: torch's CPU threads for the command's own work."""
    p.add_argument("--threads", dest="torch_threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's choice; 1 is the steadiest on a "
                        "machine other work shares)")


def add_common(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--json``, ``-q``: on every subcommand."""
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object for scripts")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str | None = None) -> None:
    """Print the result: JSON with ``--json``, else ``text`` (or the payload, readably)."""
    if args.json:
        from mpsearch._io import json_safe

        print(json.dumps(json_safe(payload), indent=2, sort_keys=True, default=str,
                         allow_nan=False))
    elif text is not None:
        print(text)
    else:
        for key, value in payload.items():
            print(f"{key}: {value}")


@contextmanager
def steps(args: argparse.Namespace, total: int, desc: str) -> Iterator[Callable[[str], None]]:
    """A progress bar over named steps (hidden with ``-q`` or ``--json``)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", leave=False,
               disable=args.quiet or args.json, file=sys.stderr)

    def advance(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        yield advance
    finally:
        bar.close()


@contextmanager
def collected_warnings(args: argparse.Namespace, into: list[str]) -> Iterator[None]:
    """Collect the export warnings into ``into`` and, without ``--json``, print them."""
    from mpsearch.export import ExportWarning

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", ExportWarning)
        yield
    for w in record:
        if issubclass(w.category, ExportWarning):
            into.append(str(w.message))
            if not args.json:
                print(f"mpsearch: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
