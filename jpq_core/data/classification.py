"""Image classification data as tensors: N x 3 x 32 x 32 float (normalised) and N labels (int64).

Sources, named by a spec string:
- "digits": scikit-learn's 8x8 handwritten digits (1,797 images, shipped with the package), upsampled
  bilinearly to 32x32 and repeated to 3 channels so that CIFAR-style networks take them unchanged. A fixed
  stratified split keeps 30% for testing.
- "cifar10:PATH": CIFAR-10 from a local folder in torchvision's layout (PATH/cifar-10-batches-py/...),
  never downloaded.
- "imagefolder:PATH": any torchvision ImageFolder tree (PATH/CLASS/*.png), with PATH/train and PATH/test
  used for the splits when present; images resized to 32x32.
"""

from __future__ import annotations

import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jpq_core.errors import JPQError

DIGITS_TEST_SHARE = 0.3
# Per-channel normalisation for each source.
_NORMALISE = {
    "digits": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagefolder": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _normalise(images: torch.Tensor, source: str) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _NORMALISE[source])
    return ((images - mean) / std).contiguous()


@lru_cache(maxsize=2)
def _digits(split: str):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SHARE, random_state=0, stratify=y.numpy())
    idx = torch.from_numpy(idx_train if split == "train" else idx_test)
    return _normalise(x[idx], "digits"), y[idx]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10's batch files (dicts, lists, bytes, NumPy arrays) and refuses anything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch file")
        return super().find_class(module, name)


CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar10(root: Path, split: str):
    """CIFAR-10's python version in torchvision's layout: ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}.

    Read here rather than through torchvision.datasets.CIFAR10, which insists on the official archives' MD5
    sums (a subset or re-packed copy fails) and unpickles without restriction.
    """
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise JPQError(f"{root}: no cifar-10-batches-py folder inside; unpack CIFAR-10's python version there (nothing is downloaded).")
    images, labels = [], []
    for name in CIFAR10_FILES[split]:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = _ArraysOnlyUnpickler(f, encoding="latin1").load()
            entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
            images.append(np.asarray(entry["data"], np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(v) for v in entry["labels"])
        except (OSError, EOFError, KeyError, ValueError, AttributeError, pickle.UnpicklingError) as exc:
            raise JPQError(f"{path}: CIFAR-10 file is missing or corrupt ({exc}).") from None
    x = torch.from_numpy(np.concatenate(images)).float() / 255.0
    return _normalise(x, "cifar10"), torch.as_tensor(labels, dtype=torch.int64)


def _image_folder(root: Path, split: str):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = root / split if (root / split).is_dir() else root
    tf = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    try:
        ds = ImageFolder(str(folder), transform=lambda img: tf(img.convert("RGB")))
    except (FileNotFoundError, RuntimeError) as exc:
        raise JPQError(f"{folder}: not an image folder with one sub-folder per class ({exc}).") from None
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return _normalise(torch.stack(xs), "imagefolder"), torch.as_tensor(ys, dtype=torch.int64)


def load_classification(spec: str, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels for `spec` ("digits", "cifar10:PATH", "imagefolder:PATH") and split train/test."""
    if split not in ("train", "test"):
        raise JPQError(f"split must be 'train' or 'test', not {split!r}.")
    source, _, path = spec.partition(":")
    if source == "digits":
        return _digits(split)
    if source in ("cifar10", "imagefolder"):
        if not path:
            raise JPQError(f"give the folder: --data {source}:PATH.")
        root = Path(path)
        if not root.is_dir():
            raise JPQError(f"{root}: no such folder.")
        return (_cifar10 if source == "cifar10" else _image_folder)(root, split)
    raise JPQError(f"unknown classification data {spec!r}; use digits, cifar10:PATH or imagefolder:PATH.")
