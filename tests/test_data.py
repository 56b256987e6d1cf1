"""Data specs: built-in datasets, ImageFolder trees and .npz files made here, bad specs."""

import numpy as np
import pytest
import torch
from PIL import Image

from qcompile.data import load_builtin, load_data
from qcompile.errors import ConfigError


def write_images(root, classes: dict[str, int], size=(12, 10), offset: int = 0) -> None:
    """``count`` PNGs per class folder; each image's colour encodes its class."""
    for index, (name, count) in enumerate(sorted(classes.items())):
        (root / name).mkdir(parents=True)
        for k in range(count):
            colour = (40 * index, 200 - 40 * index, (k + offset) % 256)
            Image.new("RGB", size, colour).save(root / name / f"{k}.png")


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_builtin_specs_give_the_builtin_split(name):
    data = load_data(name)
    split = load_builtin(name)
    assert len(data.train) == len(split.train_y) and len(data.val) == len(split.test_y)
    x, y = data.train[5]
    assert torch.equal(x, split.train_x[5]) and int(y) == int(split.train_y[5])
    assert data.input_shape == split.input_shape and data.classes == 10


def test_imagefolder_is_split_by_class_deterministically(tmp_path):
    write_images(tmp_path, {"cat": 10, "dog": 5, "eel": 2})
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.classes == 3 and data.input_shape == (3, 10, 12)
    assert sorted(labels_of(data.val)) == [0, 0, 1, 2]
    assert len(data.train) + len(data.val) == 17
    x, label = data.val[0]
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert x[0, 0, 0] == pytest.approx(40 * label / 255)
    again = load_data(f"imagefolder:{tmp_path}")
    assert again.val.indices == data.val.indices
    other = load_data(f"imagefolder:{tmp_path}", seed=1)
    assert other.val.indices != data.val.indices


def test_imagefolder_with_train_and_val_folders_and_a_size(tmp_path):
    write_images(tmp_path / "train", {"a": 3, "b": 4})
    write_images(tmp_path / "val", {"a": 1, "b": 2}, size=(20, 20))
    data = load_data(f"imagefolder:{tmp_path}", image_size=8)
    assert len(data.train) == 7 and labels_of(data.val) == [0, 1, 1]
    assert data.train[0][0].shape == data.val[0][0].shape == (3, 8, 8)


def test_imagefolder_mismatched_or_missing_folders(tmp_path):
    write_images(tmp_path / "train", {"a": 2, "b": 2})
    write_images(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(ConfigError, match="different class folders"):
        load_data(f"imagefolder:{tmp_path}")
    with pytest.raises(ConfigError, match="not a folder"):
        load_data(f"imagefolder:{tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="subfolder"):
        load_data(f"imagefolder:{tmp_path / 'empty'}")


def test_npz_with_x_and_y_is_split_and_uint8_scaled(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 6, 6), dtype=np.uint8)
    y = np.repeat(np.arange(4), 10)
    path = tmp_path / "set.npz"
    np.savez(path, x=x, y=y)
    data = load_data(str(path))
    assert data.input_shape == (1, 6, 6) and data.classes == 4
    assert len(data.val) == 8 and sorted(labels_of(data.val)) == [0, 0, 1, 1, 2, 2, 3, 3]
    inputs = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert inputs.max() <= 1.0 and inputs.dtype == torch.float32
    first = int(np.flatnonzero(~np.isin(np.arange(40), _val_rows(data, x)))[0])
    assert torch.allclose(data.train[0][0][0], torch.from_numpy(x[first] / 255.0).float())


def _val_rows(data, x) -> list[int]:
    flat = x.reshape(len(x), -1).astype(np.float32) / 255
    rows = []
    for i in range(len(data.val)):
        v = data.val[i][0].reshape(-1).numpy()
        rows.append(int(np.flatnonzero(np.all(np.isclose(flat, v), axis=1))[0]))
    return rows


def test_npz_with_its_own_split_and_channels_last(tmp_path):
    path = tmp_path / "own.npz"
    np.savez(path, x_train=np.zeros((5, 4, 4, 3), np.float32), y_train=np.arange(5),
             x_test=np.ones((2, 4, 4, 3), np.float32), y_test=np.array([1, 0]))
    data = load_data(f"npz:{path}")
    assert len(data.train) == 5 and len(data.val) == 2 and data.input_shape == (3, 4, 4)
    assert torch.equal(data.val[0][0], torch.ones(3, 4, 4)) and int(data.val[0][1]) == 1


@pytest.mark.parametrize("train, val", [("x", "x_val"), ("x_train", "x_val"), ("x", "x_test")])
def test_npz_validation_arrays_by_either_name_beside_either_training_name(tmp_path, train, val):
    """x_val / y_val are the validation data as x_test / y_test are (they were ignored, and
    part of x set aside instead)."""
    path = tmp_path / "own.npz"
    np.savez(path, **{train: np.zeros((5, 1, 4, 4), np.float32), "y" + train[1:]: np.arange(5),
                      val: np.ones((2, 1, 4, 4), np.float32), "y" + val[1:]: np.array([1, 0])})
    data = load_data(str(path))
    assert len(data.train) == 5 and len(data.val) == 2
    assert torch.equal(data.val[0][0], torch.ones(1, 4, 4))


def test_npz_problems_are_config_errors(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, inputs=np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="needs x and y"):
        load_data(str(path))
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(4, np.int64))
    with pytest.raises(ConfigError, match="one integer per input"):
        load_data(str(path))
    with pytest.raises(ConfigError, match="no such"):
        load_data(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a readable"):
        load_data(str(tmp_path / "junk.npz"))


@pytest.mark.parametrize("spec", ["cifar10", "imagefolder", "data.csv", ""])
def test_unknown_spec_lists_the_accepted_forms(spec):
    with pytest.raises(ConfigError, match="imagefolder:PATH.*npz") as error:
        load_data(spec)
    assert "mnist5k" in str(error.value) and "digits" in str(error.value)


def test_val_fraction_must_be_a_fraction():
    with pytest.raises(ConfigError, match="val_fraction"):
        load_data("digits", val_fraction=1.0)


def test_one_channel_images_are_repeated_to_the_models_channels():
    data = load_data("digits", channels=3)
    plain = load_data("digits")
    assert data.input_shape == (3, 8, 8) and data.repeated_channels == 3
    x, y = data.train[7]
    assert x.shape == (3, 8, 8) and all(torch.equal(x[c], plain.train[7][0][0]) for c in range(3))
    assert int(y) == int(plain.train[7][1]) and len(data.val) == len(plain.val)
    same = load_data("digits", channels=1)
    assert same.input_shape == (1, 8, 8) and same.repeated_channels is None


def test_imagefolder_reads_grayscale_for_a_one_channel_model(tmp_path):
    write_images(tmp_path, {"cat": 4, "dog": 4})
    data = load_data(f"imagefolder:{tmp_path}", channels=1)
    assert data.input_shape == (1, 10, 12) and data.train[0][0].shape == (1, 10, 12)
    colour = load_data(f"imagefolder:{tmp_path}", channels=3).train[0][0]
    assert colour.shape == (3, 10, 12) and not torch.equal(colour[0], colour[1])


def test_channels_that_cannot_be_made_to_fit_are_a_config_error(tmp_path):
    write_images(tmp_path, {"cat": 4, "dog": 4})
    with pytest.raises(ConfigError, match="3-channel images and the model reads 4 channels"):
        load_data(f"imagefolder:{tmp_path}", channels=4)
