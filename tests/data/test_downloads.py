"""Dataset downloads against a site on 127.0.0.1 serving small archives in the real formats (issue 19 item 1).

Each archive is built here exactly as its publisher lays it out; the md5 table is pointed at the served bytes
(`serve`), everything else (paths, unpacking, locks, the mirror rule) is the product's own.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from adakd.cli import main
from adakd.data import DatasetError, default_data_root, fetch, load_dataset
from adakd.data.idx import IMAGES_MAGIC, LABELS_MAGIC
from adakd.download import DownloadError
from fake_data_files import cifar_split, idx_bytes
from http_server import refused_url, tar_gz

# ---------------------------------------------------------------- archives in the publishers' formats




def jpeg(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.RandomState(seed).randint(0, 256, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def cifar100_site() -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """cifar-100-python.tar.gz: cifar-100-python/{train (20), test (10), meta}, pickled as the authors did."""
    splits = {"train": cifar_split(20, 0), "test": cifar_split(10, 1)}
    meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}
    members = {f"cifar-100-python/{k}": pickle.dumps(v, protocol=2) for k, v in {**splits, "meta": meta}.items()}
    return ({"cifar-100-python.tar.gz": tar_gz(members)},
            {k: list(v[b"fine_labels"]) for k, v in splits.items()})


def cifar10_batch(n: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    return {b"batch_label": b"fake", b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": [int(v) for v in rng.randint(0, 10, n)], b"filenames": [b"x.png"] * n}


def cifar10_site() -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """cifar-10-python.tar.gz: cifar-10-batches-py/{data_batch_1..5 (3 images each), test_batch (4), batches.meta}."""
    batches = {f"data_batch_{k}": cifar10_batch(3, k) for k in range(1, 6)}
    batches["test_batch"] = cifar10_batch(4, 9)
    meta = {b"label_names": [name.encode() for name in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                                        "frog", "horse", "ship", "truck")], b"num_vis": 3072}
    members = {f"cifar-10-batches-py/{k}": pickle.dumps(v, protocol=2)
               for k, v in {**batches, "batches.meta": meta}.items()}
    train = [label for k in range(1, 6) for label in batches[f"data_batch_{k}"][b"labels"]]
    return {"cifar-10-python.tar.gz": tar_gz(members)}, {"train": train, "test": batches["test_batch"][b"labels"]}


def idx_site(folder: str) -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """The four gzipped IDX files under <folder>/raw/ (6 train, 3 test images)."""
    files, labels = {}, {}
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 3)):
        rng = np.random.RandomState(n)
        labels[split] = [int(v) for v in rng.randint(0, 10, n)]
        files[f"{folder}/raw/{prefix}-images-idx3-ubyte.gz"] = gzip.compress(
            idx_bytes(rng.randint(0, 256, (n, 28, 28)), IMAGES_MAGIC))
        files[f"{folder}/raw/{prefix}-labels-idx1-ubyte.gz"] = gzip.compress(
            idx_bytes(np.array(labels[split]), LABELS_MAGIC))
    return files, labels


def svhn_site() -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """train_32x32.mat (5 images) and test_32x32.mat (2) as scipy.io.savemat writes MATLAB's format."""
    files, labels = {}, {}
    for split, n in (("train", 5), ("test", 2)):
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # 1..10, 10 standing for the digit 0
        buffer = io.BytesIO()
        savemat(buffer, {"X": np.random.RandomState(n).randint(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": y})
        files[f"{split}_32x32.mat"], labels[split] = buffer.getvalue(), [int(v) % 10 for v in y[:, 0]]
    return files, labels


def stl10_site() -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """stl10_binary.tar.gz: stl10_binary/{train,test}_{X,y}.bin (3 and 2 images) and class_names.txt."""
    members, labels = {}, {}
    for split, n in (("train", 3), ("test", 2)):
        y = np.arange(1, n + 1, dtype=np.uint8)
        members[f"stl10_binary/{split}_X.bin"] = np.random.RandomState(n).randint(0, 256, n * 27648).astype(
            np.uint8).tobytes()
        members[f"stl10_binary/{split}_y.bin"] = y.tobytes()
        labels[split] = [int(v) - 1 for v in y]
    members["stl10_binary/class_names.txt"] = "\n".join(
        ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]).encode()
    return {"stl10_binary.tar.gz": tar_gz(members)}, labels


TINY_WNIDS = ["n02", "n01"]


def tiny_imagenet_site() -> tuple[dict[str, bytes], dict[str, list[int]]]:
    """tiny-imagenet-200.zip in the official layout: train/<wnid>/images + boxes, val/images + annotations, test/."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        top = "tiny-imagenet-200/"
        archive.writestr(top + "wnids.txt", "\n".join(TINY_WNIDS) + "\n")
        archive.writestr(top + "words.txt", "n01\tgoldfish, Carassius auratus\nn02\tshark\n")
        for c, wnid in enumerate(TINY_WNIDS):
            archive.writestr(f"{top}train/{wnid}/{wnid}_boxes.txt", f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
            for k in range(2):
                archive.writestr(f"{top}train/{wnid}/images/{wnid}_{k}.JPEG", jpeg(10 * c + k))
        annotations = []
        for k, wnid in enumerate(["n02", "n01", "n01"]):
            archive.writestr(f"{top}val/images/val_{k}.JPEG", jpeg(100 + k))
            annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        archive.writestr(top + "val/val_annotations.txt", "\n".join(annotations) + "\n")
        archive.writestr(top + "test/images/test_0.JPEG", jpeg(999))
    # Classes are the sorted wnids (n01 = 0, n02 = 1); train is listed class by class.
    return {"tiny-imagenet-200.zip": buffer.getvalue()}, {"train": [0, 0, 1, 1], "test": [1, 0, 0]}


SITES = {"cifar10": cifar10_site, "cifar100": cifar100_site, "mnist": lambda: idx_site("MNIST"),
         "fashion-mnist": lambda: idx_site("FashionMNIST"), "svhn": svhn_site, "stl10": stl10_site,
         "tiny-imagenet": tiny_imagenet_site}


@pytest.fixture
def serve(file_server, monkeypatch):
    """serve(name) puts the dataset's archives on the loopback site, each at the path a mirror serves it, and points
    the md5 table at them; returns the labels each split must load with."""

    def serve(name: str) -> dict[str, list[int]]:
        files, labels = SITES[name]()
        file_server.files.update(files)
        entry = fetch.DOWNLOADS[name]
        served = lambda split: tuple(dataclasses.replace(r, md5=hashlib.md5(files[r.path]).hexdigest())  # noqa: E731
                                     for r in entry.resources(split))
        monkeypatch.setitem(fetch.DOWNLOADS, name, dataclasses.replace(entry, resources=served))
        return labels

    return serve


def leftovers(root: Path) -> list[str]:
    """What a failed download left that a later run could read: anything but lock files."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


# ---------------------------------------------------------------- every dataset


@pytest.mark.parametrize("name", list(SITES))
def test_each_dataset_downloads_unpacks_loads_and_then_stays_offline(name, serve, file_server, tmp_path):
    labels = serve(name)
    root = tmp_path / "data"
    for split in ("train", "test"):
        dataset = load_dataset(name, split, root=root, download=True, mirror=file_server.base)
        assert dataset.targets.tolist() == labels[split]
    assert file_server.requests and len(file_server.requests) == len(set(file_server.requests))  # each file once
    assert sorted(file_server.requests) == sorted(
        {r.path for split in ("train", "test") for r in fetch.DOWNLOADS[name].resources(split)})
    file_server.requests.clear()
    for split in ("train", "test"):
        again = load_dataset(name, split, root=root, download=True, mirror=file_server.base)
        assert again.targets.tolist() == labels[split]
    assert file_server.requests == []


def test_files_land_where_the_loaders_read_them(serve, file_server, tmp_path):
    for name in ("cifar100", "mnist", "tiny-imagenet"):
        serve(name)
        load_dataset(name, "test", root=tmp_path, download=True, mirror=file_server.base)
    assert (tmp_path / "cifar-100-python" / "meta").is_file() and (tmp_path / "cifar-100-python.tar.gz").is_file()
    assert sorted(p.name for p in (tmp_path / "MNIST" / "raw").iterdir() if not p.name.endswith(".lock")) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]  # only the split asked for
    # tiny-ImageNet stays as the zip lays it out, which is what the SAKD code reads: val/images + annotations.
    assert (tmp_path / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG").is_file()
    assert (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").is_file()


def test_without_a_root_the_per_user_cache_is_used_and_the_official_url_path(serve, file_server, monkeypatch):
    serve("svhn")
    entry = fetch.DOWNLOADS["svhn"]
    # The official URL replaced by the loopback one: no mirror involved.
    monkeypatch.setitem(fetch.DOWNLOADS, "svhn", dataclasses.replace(entry, resources=lambda split: tuple(
        dataclasses.replace(r, urls=(file_server.url(r.path),)) for r in entry.resources(split))))
    assert len(load_dataset("svhn", "test", download=True)) == 2
    assert default_data_root() == Path(os.environ["ADAKD_CACHE"]) / "data"
    assert (default_data_root() / "svhn" / "test_32x32.mat").is_file()  # svhn sits in <data>/svhn like ADAKD_DATA


def test_adakd_data_and_the_mirror_variable(serve, file_server, tmp_path, monkeypatch):
    serve("svhn")
    monkeypatch.setenv("ADAKD_DATA", str(tmp_path))
    monkeypatch.setenv("ADAKD_DATA_MIRROR", file_server.base)
    assert len(load_dataset("svhn", "train", download=True)) == 5
    assert (tmp_path / "svhn" / "train_32x32.mat").is_file() and file_server.requests == ["train_32x32.mat"]


def test_mnist_tries_torchvisions_next_mirror(serve, file_server, tmp_path, monkeypatch, capsys):
    serve("mnist")
    entry = fetch.DOWNLOADS["mnist"]
    dead = refused_url().rsplit("/", 1)[0] + "/"
    monkeypatch.setitem(fetch.DOWNLOADS, "mnist", dataclasses.replace(entry, resources=lambda split: tuple(
        dataclasses.replace(r, urls=(dead + r.path, file_server.url(r.path))) for r in entry.resources(split))))
    assert len(load_dataset("mnist", "test", root=tmp_path, download=True)) == 3
    assert f"adakd: cannot download {dead}MNIST/raw/t10k-images-idx3-ubyte.gz; trying torchvision's next mirror, " \
           f"{file_server.url('MNIST/raw/t10k-images-idx3-ubyte.gz')}" in capsys.readouterr().err


def test_an_archive_placed_by_hand_is_unpacked_without_network(serve, file_server, tmp_path):
    labels = serve("cifar100")
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(file_server.files["cifar-100-python.tar.gz"])
    assert load_dataset("cifar100", "test", root=tmp_path, mirror=file_server.base).targets.tolist() == labels["test"]
    assert file_server.requests == []


# ---------------------------------------------------------------- failures


def test_download_false_never_contacts_the_server(serve, file_server, tmp_path, capsys):
    serve("cifar100")
    code = main(["train", "data.name=cifar100", f"data.root={tmp_path / 'data'}", "data.download=false",
                 f"data.mirror={file_server.base}", "data.image_size=null", "model.name=resnet8",
                 f"out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("adakd: error: cifar100: no cifar-100-python folder (tried ")
    assert f"{tmp_path / 'data' / 'cifar-100-python'}" in err and "data.download=true" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert file_server.requests == []


def spoil(kind: str, file_server) -> str:
    """Make the cifar100 download fail in one way; the mirror to use."""
    if kind == "corrupt":
        good = file_server.files["cifar-100-python.tar.gz"]
        file_server.files["cifar-100-python.tar.gz"] = good[:-10] + bytes(10)
    elif kind == "truncated":
        file_server.truncate["cifar-100-python.tar.gz"] = 1000
    elif kind == "refused":
        return refused_url().rsplit("/", 1)[0] + "/"
    return file_server.base


@pytest.mark.parametrize("kind, says", [
    ("corrupt", "downloaded with md5 "), ("truncated", "was cut after 1000 B of"), ("refused", "Connection refused")])
def test_a_failed_download_is_one_line_and_leaves_nothing_a_later_run_reads(kind, says, serve, file_server, tmp_path,
                                                                         capsys):
    labels = serve("cifar100")
    root = tmp_path / "data"
    mirror = spoil(kind, file_server)
    argv = ["train", "data.name=cifar100", f"data.root={root}", f"data.mirror={mirror}", "data.image_size=null",
            "model.name=resnet8", f"out_dir={tmp_path / 'runs'}"]
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("adakd: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err
    line = errors[0]
    assert says in line and f"{mirror}cifar-100-python.tar.gz" in line
    assert f"copy it to {root / 'cifar-100-python.tar.gz'} (adakd unpacks it into {root / 'cifar-100-python'}/)" in line
    assert "data.mirror=URL (or ADAKD_DATA_MIRROR)" in line
    assert leftovers(root) == []
    # The site repaired, the same command downloads and loads: nothing stale was kept.
    file_server.truncate.clear()
    file_server.files.update(cifar100_site()[0])
    assert load_dataset("cifar100", "test", root=root, download=True,
                        mirror=file_server.base).targets.tolist() == labels["test"]


def test_imagenet_says_where_to_get_it_and_the_layout(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset("imagenet", "train", root=tmp_path, download=True)
    text = str(err.value)
    for fragment in ("imagenet: missing folder train/", "cannot be downloaded for you", "https://image-net.org",
                     "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "<root>/val/<wnid>/*.JPEG",
                     "d.ImageNet('<root>', split='val')", "val images sorted into their class folders"):
        assert fragment in text, fragment


def test_a_mirror_that_is_not_a_url_is_refused(tmp_path, capsys):
    assert main(["train", "data.mirror=mirror.local", f"out_dir={tmp_path}"]) == 2
    assert "data.mirror must be a base URL such as https://host/datasets/" in capsys.readouterr().err


CHILD = """
import dataclasses, sys
from adakd.data import fetch, load_dataset
entry = fetch.DOWNLOADS["cifar100"]
fetch.DOWNLOADS["cifar100"] = dataclasses.replace(entry, resources=lambda split: tuple(
    dataclasses.replace(r, md5=sys.argv[3]) for r in entry.resources(split)))
print(len(load_dataset("cifar100", "train", root=sys.argv[1], download=True, mirror=sys.argv[2])), flush=True)
"""


@pytest.mark.slow  # two processes racing for one download (29 s on 2 cores)
def test_two_runs_starting_at_once_download_once_and_both_load(serve, file_server, tmp_path):
    serve("cifar100")
    archive = file_server.files["cifar-100-python.tar.gz"]
    # About 3 s of download: both processes import torch meanwhile, and whichever locks second waits.
    file_server.chunk_size, file_server.delay = max(len(archive) // 16, 1), 0.2
    env = {**os.environ, "no_proxy": "127.0.0.1"}
    command = [sys.executable, "-c", CHILD, str(tmp_path), file_server.base, hashlib.md5(archive).hexdigest()]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
    results = [process.communicate(timeout=120) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], results
    assert [out.strip() for out, _ in results] == ["20", "20"]
    assert file_server.requests == ["cifar-100-python.tar.gz"]
    waited = ["waiting for another process downloading cifar-100-python.tar.gz" in err for _, err in results]
    assert sorted(waited) == [False, True], results


def test_cli_run_downloads_into_the_cache_and_trains(serve, file_server, capsys):
    serve("cifar100")
    cache = Path(os.environ["ADAKD_CACHE"])
    code = main(["train", "data.name=cifar100", f"data.mirror={file_server.base}", "data.image_size=null",
                 "model.name=resnet8", "optim.epochs=1", "optim.milestones=[]", "data.batch_size=8",
                 "log.progress=false", "log.tensorboard=false", f"out_dir={cache / 'runs'}", "name=dl"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"adakd: downloading {file_server.base}cifar-100-python.tar.gz into {cache / 'data'}" in err
    assert (cache / "data" / "cifar-100-python" / "train").is_file() and (cache / "runs" / "dl").is_dir()


# ---------------------------------------------------------------- loaders


def test_tiny_imagenet_reads_val_sorted_into_class_folders_too(serve, file_server, tmp_path):
    serve("tiny-imagenet")
    official = load_dataset("tiny-imagenet", "test", root=tmp_path, download=True, mirror=file_server.base)
    val = tmp_path / "tiny-imagenet-200" / "val"
    by_label = lambda ds: sorted((int(t), ds.images[i].sum().item()) for i, t in enumerate(ds.targets))  # noqa: E731
    wnid_of = dict(line.split("\t")[:2] for line in (val / "val_annotations.txt").read_text().splitlines())
    for nested in ("images", ""):  # mdistiller's val/<wnid>/images/ and the plain val/<wnid>/
        sorted_root = tmp_path / f"sorted{nested}"
        sorted_val = sorted_root / "tiny-imagenet-200" / "val"
        (sorted_root / "tiny-imagenet-200").mkdir(parents=True)
        (sorted_root / "tiny-imagenet-200" / "wnids.txt").write_bytes((val.parent / "wnids.txt").read_bytes())
        for image in (val / "images").iterdir():
            target = sorted_val / wnid_of[image.name] / nested / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image.read_bytes())
        resorted = load_dataset("tiny-imagenet", "test", root=sorted_root)
        assert by_label(resorted) == by_label(official)
    (sorted_val / "n99").mkdir()
    with pytest.raises(DatasetError, match=r"val/ holds class folders that wnids.txt does not list: \['n99'\]"):
        load_dataset("tiny-imagenet", "test", root=sorted_root)


def test_cifar10_pixels_classes_and_bad_labels(serve, file_server, tmp_path):
    serve("cifar10")
    train = load_dataset("cifar10", "train", root=tmp_path, download=True, mirror=file_server.base)
    batch = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_2").read_bytes(), encoding="bytes")
    # Image 3 is the first of data_batch_2; its row is 1024 red, 1024 green, 1024 blue values.
    assert torch.equal(train.images[3], torch.from_numpy(batch[b"data"][0].reshape(3, 32, 32)))
    assert train.classes[1] == "automobile" and len(train) == 15 and train.augment == "crop_flip"
    assert (train.mean, train.std) == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    batch[b"labels"][0] = 10
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DatasetError, match=r"cifar10: data_batch_2 labels lie in \[\d+, 10\], not \[0, 10\)"):
        load_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(DatasetError, match=r"cifar10: no cifar-10-batches-py folder .*ADAKD_DATA_CIFAR10"):
        load_dataset("cifar10", "test", root=tmp_path / "empty")


def test_a_mirror_without_the_file_names_the_http_status(file_server, tmp_path):
    with pytest.raises(DownloadError, match=rf"cannot download {file_server.base}test_32x32.mat: the server answered "
                                            r"HTTP 404 Not Found\. Download http://ufldl.stanford.edu/housenumbers/"
                                            r"test_32x32.mat \(md5 eb5a983be6a315427106f1b164d9cef3\)"):
        load_dataset("svhn", "test", root=tmp_path, download=True, mirror=file_server.base)
    assert leftovers(tmp_path) == []
