"""CIFAR-100 from fake files in the authors' pickle format: pixels, labels, every error case, a malicious pickle."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from adakd.data import ArrayDataset, DatasetError, load_dataset
from fake_data_files import cifar_split, write_pickle


def test_loads_pixels_in_channel_planes_and_labels(cifar_root: Path) -> None:
    raw = cifar_split(20, 0)
    ds = load_dataset("cifar100", "train", root=cifar_root)
    assert isinstance(ds, ArrayDataset) and len(ds) == 20 and ds.images.shape == (20, 3, 32, 32)
    # The file stores 1024 R values, then 1024 G, then 1024 B, each plane row-major: pixel (y=5, x=7) of image 3.
    for channel in range(3):
        assert ds.images[3, channel, 5, 7] == raw[b"data"][3, channel * 1024 + 5 * 32 + 7]
    assert ds.targets.tolist() == raw[b"fine_labels"] and ds.targets.dtype == torch.int64
    assert ds.num_classes == 100 and ds.classes[7] == "fine_7"
    assert ds.mean == (0.5071, 0.4867, 0.4408) and ds.std == (0.2675, 0.2565, 0.2761)
    assert ds.augment == "crop_flip" and ds.crop_padding == 4


def test_test_split_and_root_at_the_folder_itself(cifar_root: Path) -> None:
    ds = load_dataset("cifar100", "test", root=cifar_root / "cifar-100-python")  # protocol-4 pickle
    assert len(ds) == 10 and ds.augment == "none"
    image, target, index = ds[4]
    assert index == 4 and target == int(ds.targets[4]) and image.dtype == torch.float32


def test_numpy_1_pickles_load_without_warnings(cifar_root: Path, recwarn: pytest.WarningsRecorder) -> None:
    # The authors' files were written by numpy 1.x, whose arrays name numpy.core.multiarray._reconstruct.
    path = cifar_root / "cifar-100-python" / "train"
    raw = pickle.dumps(cifar_split(20, 0), protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in raw  # protocol 2 names globals as text lines
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    ds = load_dataset("cifar100", "train", root=cifar_root)
    assert ds.images[3, 2, 5, 7] == cifar_split(20, 0)[b"data"][3, 2 * 1024 + 5 * 32 + 7]
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_root_from_environment(cifar_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADAKD_DATA", str(cifar_root))
    assert len(load_dataset("cifar100", "test")) == 10
    monkeypatch.setenv("ADAKD_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("ADAKD_DATA_CIFAR100", str(cifar_root / "cifar-100-python"))  # the specific one wins
    assert len(load_dataset("cifar100", "test")) == 10


def test_no_root_names_both_ways() -> None:
    with pytest.raises(DatasetError, match="ADAKD_DATA_CIFAR100") as info:
        load_dataset("cifar100", "train")
    assert "data.root" in str(info.value) and "ADAKD_DATA " in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no cifar-100-python folder") as info:
        load_dataset("cifar100", "train", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-100-python") in message and "train, test, meta" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message


@pytest.mark.parametrize("missing", ["meta", "test"])
def test_missing_file(cifar_root: Path, missing: str) -> None:
    (cifar_root / "cifar-100-python" / missing).unlink()
    with pytest.raises(DatasetError, match=f"missing file {missing}"):
        load_dataset("cifar100", "test", root=cifar_root)


def test_truncated_pickle(cifar_root: Path) -> None:
    path = cifar_root / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DatasetError, match="cannot read train as a CIFAR pickle.*truncated") as info:
        load_dataset("cifar100", "train", root=cifar_root)
    assert info.value.__cause__ is None and str(path) in str(info.value)


def _edit_train(root: Path, **changes: object) -> None:
    obj = cifar_split(20, 0)
    obj.update({k.encode(): v for k, v in changes.items()})
    write_pickle(root / "cifar-100-python" / "train", obj)


@pytest.mark.parametrize("changes, message", [
    ({"data": np.zeros((20, 3000), np.uint8)}, "N x 3072 uint8"),
    ({"data": np.zeros((20, 3072), np.float32)}, "N x 3072 uint8"),
    ({"fine_labels": [0] * 19}, "20 images but 19 fine labels"),
    ({"fine_labels": [0] * 19 + [100]}, r"fine labels lie in \[0, 100\], not \[0, 100\)"),
    ({"fine_labels": [-1] + [0] * 19}, "fine labels lie in"),
])
def test_bad_arrays(cifar_root: Path, changes: dict, message: str) -> None:
    _edit_train(cifar_root, **changes)
    with pytest.raises(DatasetError, match=message):
        load_dataset("cifar100", "train", root=cifar_root)


def test_missing_key_and_not_a_dict(cifar_root: Path) -> None:
    write_pickle(cifar_root / "cifar-100-python" / "meta", {b"label_names": []})
    with pytest.raises(DatasetError, match="meta has no key b'fine_label_names'"):
        load_dataset("cifar100", "train", root=cifar_root)
    write_pickle(cifar_root / "cifar-100-python" / "meta", [1, 2])
    with pytest.raises(DatasetError, match="meta holds a list"):
        load_dataset("cifar100", "train", root=cifar_root)


class _Exploit:
    """Unpickling this would create the marker file (os.system stands for any code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(cifar_root: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    write_pickle(cifar_root / "cifar-100-python" / "train", {b"data": _Exploit(marker)})
    with pytest.raises(DatasetError, match="refused global (posix|os|nt).system"):
        load_dataset("cifar100", "train", root=cifar_root)
    assert not marker.exists()
    # Sanity: the same file, loaded by the unrestricted pickle module, would indeed have run the command.
    pickle.loads((cifar_root / "cifar-100-python" / "train").read_bytes())
    assert marker.exists()
