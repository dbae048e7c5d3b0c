"""The networks the dashboard compresses, by name, and their shipped checkpoints.

Names:
- the shipped networks: "stereo", "resnet20", "resnet18" (ResNet-18 with a 32x32 stem), trained checkpoints
  in `cached_runs/checkpoints/`;
- "tv:NAME": any model of torchvision's classification zoo (`torchvision.models.list_models`), built with
  weights=None (nothing downloads) and the data's number of classes; randomly initialised unless the user
  brings weights;
- a user's own module, registered from the command line only (`register_factory("path/to/file.py:factory")`,
  the CLI's `--model`): the file is run as Python, so it is never taken from an upload or a saved setting.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from jpq_core.checkpoints import MAX_CHECKPOINT_BYTES, load_weights, read_sidecar
from jpq_core.errors import JPQError
from jpq_core.models.resnet import ResNet20, resnet18_cifar
from jpq_core.models.stereo import StereoNet

CACHED_RUNS = Path(__file__).resolve().parents[2] / "cached_runs"
TORCHVISION = "tv:"  # prefix of torchvision classification models
USER = "user:"  # prefix of factories registered from the command line
DEFAULT_CLASSES = 10
# torchvision models with auxiliary classifiers that run only in training mode, where the forward then returns a
# tuple. This library trains and measures the main output only (a tuple would break fine-tuning's loss, and
# layers that never run in eval mode cannot be calibrated), so they are built without them; a checkpoint that
# has them (torchvision's own weights do) loads with those tensors left out.
TRAINING_ONLY_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
INIT_SEED = 0  # networks without trained weights are initialised from this seed, so runs are repeatable
CLASSIFIER_INPUT = (3, 32, 32)  # what every classification data set of jpq_core.data.classification gives

# name -> (constructor, task)
NETWORKS = {
    "stereo": (StereoNet, "stereo"),
    "resnet20": (ResNet20, "classification"),
    "resnet18": (resnet18_cifar, "classification"),
}
# name -> what the app calls it (the data it is shown on)
NETWORK_LABELS = {"stereo": "Stereo network (Middlebury pair)", "resnet20": "ResNet-20 (digits)",
                  "resnet18": "ResNet-18 (CIFAR-10)"}


def network_label(name: str) -> str:
    """The network's name as the app shows it (a torchvision model: its torchvision name, on digits)."""
    if isinstance(name, str) and name.startswith(TORCHVISION):  # named, not checked: importing torchvision takes seconds
        return f"torchvision {name[len(TORCHVISION):]} (digits)"
    return NETWORK_LABELS.get(_check_name(name), name)


_FACTORIES: dict[str, object] = {}  # user: names -> factory callables (this process only)


def torchvision_models() -> list[str]:
    """torchvision's classification models, as this library names them ("tv:resnet18", ...)."""
    import torchvision

    return [TORCHVISION + n for n in torchvision.models.list_models(module=torchvision.models)]


def task_of(name: str) -> str:
    if name.startswith((TORCHVISION, USER)):
        _check_name(name)
        return "classification"
    return NETWORKS[_check_name(name)][1]


def is_shipped(name: str) -> bool:
    """Whether `name` is one of the networks with a trained checkpoint in the project."""
    return name in NETWORKS


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise JPQError(f"a network name must be text, got {name!r}.")
    if name in NETWORKS or name in _FACTORIES:
        return name
    if name.startswith(TORCHVISION):
        if name in torchvision_models():
            return name
        raise JPQError(f"torchvision has no classification model {name[len(TORCHVISION):]!r}; "
                       "see torchvision.models.list_models() (e.g. tv:resnet18, tv:mobilenet_v2).")
    if name.startswith(USER):
        raise JPQError(f"{name!r} is a user factory that this process has not loaded; give it with --model FILE.py:FACTORY.")
    raise JPQError(f"unknown network {name!r}; choose one of: {', '.join(NETWORKS)}, tv:NAME (a torchvision "
                   "classification model), or your own module with --model FILE.py:FACTORY.")


def register_factory(spec: str) -> str:
    """Load `path/to/file.py:factory` and register it; returns its network name ("user:path:factory").

    This runs the file's code: call it only for a file the user named on the command line."""
    path, sep, attr = str(spec).rpartition(":")
    if not sep or not path or not attr.isidentifier():
        raise JPQError(f"--model wants FILE.py:FACTORY (a Python file and a function in it), got {spec!r}.")
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise JPQError(f"--model {spec}: {file} is not a Python file; check the path.")
    module_spec = importlib.util.spec_from_file_location(f"jpq_user_model_{len(_FACTORIES)}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: any error it raises is theirs to fix
        raise JPQError(f"--model {spec}: running {file} failed ({type(exc).__name__}: {exc}).") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise JPQError(f"--model {spec}: {file} defines no function {attr!r}.")
    name = f"{USER}{file}:{attr}"
    _FACTORIES[name] = factory
    return name


def _takes(factory, keyword: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _from_factory(name: str, num_classes: int | None) -> nn.Module:
    factory = _FACTORIES[name]
    kwargs = {"num_classes": num_classes} if num_classes is not None and _takes(factory, "num_classes") else {}
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the user's code
        raise JPQError(f"the model factory {name[len(USER):]} raised {type(exc).__name__}: {exc}.") from None
    if not isinstance(model, nn.Module):
        raise JPQError(f"the model factory {name[len(USER):]} returned a {type(model).__name__}, not a torch.nn.Module; "
                       "make it return the network.")
    return model


def check_classifier_output(name: str, model: nn.Module, num_classes: int | None = None) -> nn.Module:
    """`model` after one forward pass on two blank images at the data's size, which must give an N x classes
    tensor: a network brought by a user that returns a dict, a tuple or a feature map would otherwise fail
    deep inside the loss, the metrics or the engine, with a stack trace instead of a reason."""
    shown = name[len(USER):] if name.startswith(USER) else name
    example = torch.zeros(2, *CLASSIFIER_INPUT)
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # the user's forward: any error it raises is theirs to fix
        raise JPQError(f"{shown}: running it on a {' x '.join(map(str, example.shape))} batch of images failed "
                       f"({type(exc).__name__}: {exc}); a classifier here takes N x 3 x 32 x 32 images.") from None
    if not isinstance(out, torch.Tensor):
        raise JPQError(f"{shown}: its forward returned a {type(out).__name__}, not a tensor; a classifier here must "
                       "return the N x classes tensor of logits.")
    if out.dim() != 2 or out.shape[0] != len(example):
        raise JPQError(f"{shown}: its forward returned a tensor of shape {tuple(out.shape)} for {len(example)} images; a "
                       "classifier here must return N x classes logits (pool and flatten before the last layer).")
    if num_classes is not None and out.shape[1] < num_classes:
        raise JPQError(f"{shown}: it has {out.shape[1]} outputs but the data has {num_classes} classes.")
    return model


def build_network(name: str, num_classes: int | None = None, **config) -> nn.Module:
    """A freshly initialised network; `num_classes` sets the classifier's outputs of torchvision models and
    user factories that take it (the shipped networks take theirs from `config`)."""
    _check_name(name)
    if name in NETWORKS:
        return NETWORKS[name][0](**config)
    torch.manual_seed(INIT_SEED)
    if name in _FACTORIES:
        return _from_factory(name, num_classes)
    import torchvision

    arch = name[len(TORCHVISION):]
    if arch in TRAINING_ONLY_HEADS:
        config = {"aux_logits": False, "init_weights": True, **config}
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes or DEFAULT_CLASSES, **config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise JPQError(f"torchvision could not build {name!r} with {config or 'its defaults'} ({exc}).") from None


class _EmptyOnMeta(TorchFunctionMode):
    """`torch.empty` without a device gives a meta tensor (no memory, no data); every other tensor is made
    as usual. PyTorch's layers create their weights with `torch.empty`, so a network built here has its
    weights on the meta device, while an architecture that computes its shape with tensors (RegNet's block
    widths, `torch.round(...).tolist()`) still has the numbers it needs, which `torch.device("meta")` takes away."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def parameter_count(name: str, num_classes: int | None = None) -> int:
    """The number of parameters of `name`, counted without allocating its weights where possible, so that a
    zoo model of 640M parameters (regnet_y_128gf, vit_h_14) can be refused before it takes 2.5 GB.

    First on the meta device (every tensor, also a user's `nn.Parameter(torch.randn(...))`); where the
    constructor needs tensor data (RegNet), with only `torch.empty` on meta; the real network last."""
    for place in (lambda: torch.device("meta"), _EmptyOnMeta):
        try:
            with place():
                model = build_network(name, num_classes)
            return sum(p.numel() for p in model.parameters())
        except (JPQError, RuntimeError, NotImplementedError):  # a constructor that needs data: try the next way
            pass
    return sum(p.numel() for p in build_network(name, num_classes).parameters())


def shipped_checkpoint(name: str) -> Path:
    """Where the trained checkpoint of `name` is kept in `cached_runs/`."""
    return CACHED_RUNS / "checkpoints" / f"{_check_name(name)}.safetensors"


def load_network(name: str, checkpoint: Path | None = None, num_classes: int | None = None) -> nn.Module:
    """`name` with trained weights in eval mode: the shipped checkpoint unless `checkpoint` is given; a
    torchvision model or user factory without `checkpoint` keeps its random initialisation (its accuracy
    means nothing; its cost, scores and engine speed do)."""
    _check_name(name)
    if not is_shipped(name):
        params = parameter_count(name, num_classes)  # a giant zoo model must not take the memory
        if params * 4 > MAX_CHECKPOINT_BYTES:
            raise JPQError(f"{name!r} has {params:,} parameters, over the {MAX_CHECKPOINT_BYTES // 2**20} MiB limit for "
                           "networks; choose a smaller model.")
        model = build_network(name, num_classes)
        if checkpoint is not None:
            model = load_weights(model, Path(checkpoint), ignore=TRAINING_ONLY_HEADS.get(name[len(TORCHVISION):], ()))
        model = model.eval()
        return check_classifier_output(name, model, num_classes)
    path = Path(checkpoint) if checkpoint is not None else shipped_checkpoint(name)
    if checkpoint is None and not path.exists():
        raise JPQError(f"no shipped checkpoint for {name!r} at {path}; train one with `python -m jpq_core train {name}`.")
    config = read_sidecar(path).get("config", {}) if path.exists() else {}
    if config.get("network", name) != name:
        raise JPQError(f"{path}: is a {config['network']!r} checkpoint, not {name!r}.")
    arch = config.get("architecture", {})
    try:  # on the meta device first: a sidecar asking for a giant network must not take the memory
        with torch.device("meta"):
            params = sum(p.numel() for p in build_network(name, **arch).parameters())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise JPQError(f"{path}: its sidecar's architecture settings {arch} do not build a {name!r} network ({exc}); "
                       "fix or delete the .json beside it.") from None
    if params * 4 > MAX_CHECKPOINT_BYTES:
        raise JPQError(f"{path}: its sidecar asks for a {name!r} network of {params:,} parameters, over the checkpoint size limit.")
    return load_weights(build_network(name, **arch), path).eval()
