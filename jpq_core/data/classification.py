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


def _cifar10(root: Path, split: str):
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        # torchvision checks the official archives' MD5 sums; a local copy or a subset written in the same
        # format has other sums, so only the files' presence is checked here.
        def _check_integrity(self) -> bool:
            base = Path(self.root) / self.base_folder
            return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    if not (root / "cifar-10-batches-py").is_dir():
        raise JPQError(f"{root}: no cifar-10-batches-py folder inside; unpack CIFAR-10's python version there (nothing is downloaded).")
    try:
        ds = LocalCIFAR10(str(root), train=(split == "train"), download=False)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as exc:
        raise JPQError(f"{root}: CIFAR-10 files are missing or corrupt ({exc}).") from None
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float() / 255.0
    return _normalise(x, "cifar10"), torch.as_tensor(ds.targets, dtype=torch.int64)


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
