"""Classification loaders: digits split, CIFAR-10 from a local folder, ImageFolder."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from jpq_core.data.classification import CIFAR10_CLASSES, load_classification
from jpq_core.errors import JPQError


def test_digits_are_32x32_rgb_and_split_stratified():
    x_train, y_train = load_classification("digits", "train")
    x_test, y_test = load_classification("digits", "test")
    assert x_train.shape[1:] == x_test.shape[1:] == (3, 32, 32)
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == 540
    assert set(y_test.tolist()) == set(range(10))
    # no test image is also a training image
    flat_train = {tuple(v) for v in x_train[:, 0, ::4, ::4].reshape(len(x_train), -1).round(decimals=4).tolist()}
    overlap = sum(tuple(v) in flat_train for v in x_test[:, 0, ::4, ::4].reshape(len(x_test), -1).round(decimals=4).tolist())
    assert overlap < 5  # the data set itself has a few identical digits


def _write_cifar(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for name in names:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return written


def test_cifar10_from_a_local_folder(tmp_path):
    written = _write_cifar(tmp_path)
    x, y = load_classification(f"cifar10:{tmp_path}", "test")
    data, labels = written["test_batch"]
    assert x.shape == (4, 3, 32, 32) and y.tolist() == labels
    # pixel (channel 0, row 0, col 0) of image 0, normalised with CIFAR-10's mean and std
    assert x[0, 0, 0, 0].item() == pytest.approx((data[0, 0] / 255 - 0.4914) / 0.2470, rel=1e-5)
    x_train, _ = load_classification(f"cifar10:{tmp_path}", "train")
    assert len(x_train) == 20


def test_cifar10_missing_or_corrupt_is_a_clear_error(tmp_path):
    with pytest.raises(JPQError, match="no cifar-10-batches-py folder"):
        load_classification(f"cifar10:{tmp_path}")
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04truncated")
    with pytest.raises(JPQError, match="missing or corrupt"):
        load_classification(f"cifar10:{tmp_path}", "test")
    with pytest.raises(JPQError, match="give the folder"):
        load_classification("cifar10")
    with pytest.raises(JPQError, match="unknown classification data"):
        load_classification("mnist")


def test_image_folder_with_train_and_test(tmp_path):
    for split in ("train", "test"):
        for cls, colour in (("cats", 0), ("dogs", 255)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 24, 3), colour, np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    x, y = load_classification(f"imagefolder:{tmp_path}", "test")
    assert x.shape == (4, 3, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1]
    assert torch.all(x[y == 1] > x[y == 0].max())


def test_cifar10_batch_that_would_run_code_is_refused(tmp_path, code_running_object):
    _write_cifar(tmp_path)
    target = tmp_path / "pwned.txt"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": code_running_object(target), "labels": []}, f)
    with pytest.raises(JPQError, match="is not allowed"):
        load_classification(f"cifar10:{tmp_path}", "test")
    assert not target.exists()
