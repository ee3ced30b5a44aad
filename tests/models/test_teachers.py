"""`adakd teachers` list / fetch / verify against a loopback server serving a cifar_teachers.tar in mdistiller's real
layout (cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth, each the CRD benchmark's checkpoint dict), and a run or
sweep finding the fetched teacher."""
from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adakd import models
from adakd.cli import main
from adakd.engine.trainer import teacher_candidate
from adakd.models import teachers
from adakd.models.teachers import PublishedTeacher, TeacherError
from http_server import refused_url

ARCHIVE = "releases/download/checkpoints/cifar_teachers.tar"
# The real resnet56 entry, and a small stand-in so `--all` stays fast (the real table's ResNet50 alone is 95 MB).
TABLE = {"resnet56": teachers.PUBLISHED["resnet56"],
         "resnet8": PublishedTeacher("resnet8", "cifar100", 100, "archive", top1=60.0)}
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


@pytest.fixture(autouse=True)
def small_table(monkeypatch, tmp_path):
    """The published table cut to resnet56 and a tiny resnet8; torch.hub's folder in tmp; no mirror set."""
    saved = dict(teachers.PUBLISHED)
    teachers.PUBLISHED.clear()
    teachers.PUBLISHED.update(TABLE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(teachers.URL_ENV, raising=False)
    yield
    teachers.PUBLISHED.clear()
    teachers.PUBLISHED.update(saved)


@functools.lru_cache(maxsize=None)
def crd_checkpoint(name: str, seed: int = 0, as_model: str | None = None) -> bytes:
    """A checkpoint as the CRD benchmark's train_teacher.py saves ckpt_epoch_240.pth (mdistiller ships those files):
    epoch, model, accuracy (a tensor there; a numpy scalar in files passed around the field) and the optimizer."""
    torch.manual_seed(seed)
    model = models.create(as_model or name, num_classes=100)
    with torch.no_grad():  # running statistics that are not the defaults, so a load that skipped them shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    accuracy = torch.tensor(72.34) if name == "resnet56" else np.float64(60.0)
    buffer = io.BytesIO()
    torch.save({"epoch": 240, "model": model.state_dict(), "accuracy": accuracy,
                "optimizer": optimizer.state_dict()}, buffer)
    return buffer.getvalue()


def teachers_tar(members: dict[str, bytes]) -> bytes:
    """cifar_teachers.tar as `tar cf` writes it: the folders, then <name>_vanilla/ckpt_epoch_240.pth in each."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folders = ["cifar_teachers", *(f"cifar_teachers/{name}_vanilla" for name in members)]
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar_teachers/{name}_vanilla/ckpt_epoch_240.pth")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def good_tar() -> bytes:
    return teachers_tar({"resnet56": crd_checkpoint("resnet56"), "resnet8": crd_checkpoint("resnet8")})


@pytest.fixture
def site(file_server):
    """The release asset on the loopback server, and ADAKD_TEACHERS_URL pointing at it (as a mirror would)."""
    file_server.files[ARCHIVE] = good_tar()
    return file_server


def fetch_cli(capsys, site, *args: str) -> tuple[int, str, str]:
    code = main(["teachers", "fetch", *args, "--url", site.url(ARCHIVE)])
    out, err = capsys.readouterr()
    return code, out, err


def folder() -> Path:
    return teachers.teachers_dir()


def manifest() -> dict:
    return json.loads((folder() / "manifest.json").read_text())["teachers"]


def one_error_line(code: int, err: str) -> str:
    """The CLI's one line for bad input: exit 2, 'adakd: error:', no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("adakd: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ list and fetch


def test_list_shows_each_teacher_absent_then_present_with_its_file(capsys, site):
    assert main(["teachers"]) == 0
    before = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:3]}
    assert before["resnet56"].split()[1:4] == ["cifar100", "72.34", "-"]
    assert before["resnet56"].split()[4] == teachers.ARCHIVE_URL
    assert fetch_cli(capsys, site, "resnet56")[0] == 0
    assert main(["teachers"]) == 0
    after = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:3]}
    assert after["resnet56"].split()[3] == str(folder() / "resnet56_vanilla" / "ckpt_epoch_240.pth")
    assert after["resnet8"].split()[3] == "-"


def test_fetch_one_places_strict_loads_and_records_it_and_a_second_fetch_stays_offline(capsys, site):
    code, out, err = fetch_cli(capsys, site, "resnet56")
    path = folder() / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    assert code == 0 and f"resnet56: fetched: {path}" in out
    assert f"adakd: downloading {site.url(ARCHIVE)} into " in err
    assert path.read_bytes() == crd_checkpoint("resnet56")  # the member, byte for byte
    assert not (folder() / "resnet8_vanilla").exists()  # only what was asked for
    record = manifest()["resnet56"]
    assert record["sha256"] == hashlib.sha256(crd_checkpoint("resnet56")).hexdigest()
    assert record["size"] == len(crd_checkpoint("resnet56")) and record["url"] == site.url(ARCHIVE)
    assert record["file"] == "resnet56_vanilla/ckpt_epoch_240.pth" and record["file_epoch"] == 240
    assert record["file_accuracy"] == pytest.approx(72.34, abs=1e-4)
    loaded = models.load_weights(models.create("resnet56", num_classes=100), path)
    saved = torch.load(io.BytesIO(crd_checkpoint("resnet56")), weights_only=True)["model"]
    assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in saved)
    # Again: nothing is asked of the server. A second teacher comes from the kept archive, still one request.
    code, out, _ = fetch_cli(capsys, site, "resnet56")
    assert code == 0 and f"resnet56: already here: {path}" in out
    assert fetch_cli(capsys, site, "resnet8")[0] == 0
    assert site.requests == [ARCHIVE]


def test_fetch_all_removes_the_archive_once_everything_is_unpacked(capsys, site):
    code, out, _ = fetch_cli(capsys, site, "--all")
    assert code == 0 and "resnet56: fetched" in out and "resnet8: fetched" in out
    assert set(manifest()) == {"resnet56", "resnet8"}
    assert not (folder() / ".download" / "cifar_teachers.tar").exists()  # no second copy of 2 x the weights
    assert "accuracy" not in manifest()["resnet8"] and manifest()["resnet8"]["file_accuracy"] == 60.0  # numpy
    code, out, _ = fetch_cli(capsys, site, "--all")
    assert code == 0 and out.count("already here") == 2 and site.requests == [ARCHIVE]


def test_fetch_into_dir_and_into_ADAKD_TEACHERS(capsys, site, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    code, out, _ = fetch_cli(capsys, site, "resnet8", "--dir", str(mine))
    assert code == 0 and (mine / "resnet8_vanilla" / "ckpt_epoch_240.pth").is_file()
    assert f"ADAKD_TEACHERS={mine}" in out  # runs do not look in a --dir by themselves: say how
    assert teacher_candidate("resnet8") is None
    monkeypatch.setenv("ADAKD_TEACHERS", str(mine))
    assert teacher_candidate("resnet8") == mine / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    assert teacher_candidate("resnet8", num_classes=200) is None  # a CIFAR-100 teacher is no tiny-ImageNet one


@pytest.mark.parametrize("argv, fragment", [
    (["teachers", "fetch"], "name the teachers to fetch"),
    (["teachers", "fetch", "resnet8", "--all"], "not both"),
    (["teachers", "fetch", "resnet57"], "'resnet57' is not a published teacher adakd knows; did you mean resnet56"),
    (["teachers", "verify", "resnet57"], "did you mean resnet56"),
    (["teachers", "fetch", "resnet8", "--url", "/nonexistent/cifar_teachers.tar"],
     "teachers archive /nonexistent/cifar_teachers.tar does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    line = one_error_line(main(argv), capsys.readouterr().err)
    assert fragment in line
    assert not (folder() / "manifest.json").exists()


def test_a_member_that_does_not_fit_its_model_is_one_error_and_gets_no_manifest_entry(capsys, file_server):
    # resnet8's folder holds a resnet20 (a mislabelled or damaged archive); resnet56 beside it is fine.
    file_server.files[ARCHIVE] = teachers_tar({"resnet56": crd_checkpoint("resnet56"),
                                               "resnet8": crd_checkpoint("resnet8", as_model="resnet20")})
    code, out, err = fetch_cli(capsys, file_server, "--all")
    line = one_error_line(code, err)
    assert f"resnet8: checkpoint '{folder() / '.download' / 'cifar_teachers.tar'}:cifar_teachers/resnet8_vanilla/" \
           "ckpt_epoch_240.pth' does not fit model 'resnet8' (" in line
    assert "Not installed (resnet56 fetched)" in line
    assert set(manifest()) == {"resnet56"}
    assert not (folder() / "resnet8_vanilla" / "ckpt_epoch_240.pth").exists()
    assert [p.name for p in (folder() / "resnet8_vanilla").iterdir()] == []  # no partial file left
    assert teacher_candidate("resnet8") is None


def test_an_archive_without_the_teacher_names_what_it_holds(capsys, file_server):
    file_server.files[ARCHIVE] = teachers_tar({"resnet56": crd_checkpoint("resnet56")})
    line = one_error_line(*fetch_cli(capsys, file_server, "resnet8")[::2])
    assert "has no cifar_teachers/resnet8_vanilla/ckpt_epoch_240.pth (it holds resnet56_vanilla)" in line


# ------------------------------------------------------------------------------------------------ changed files


def test_a_file_changed_after_fetch_is_refused_by_runs_verify_and_list_and_fetch_restores_it(capsys, site, tmp_path):
    fetch_cli(capsys, site, "resnet56")
    path = folder() / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    root = fake_cifar_root(tmp_path / "data", path, agree=5)
    other = crd_checkpoint("resnet56", seed=1)  # a loadable resnet56 with other weights: only the hash tells
    time.sleep(0.01)  # a later mtime, as a real edit
    path.write_bytes(other)
    with pytest.raises(TeacherError, match="was changed after `adakd teachers fetch` wrote it"):
        teacher_candidate("resnet56")
    code = main(["distill", "teacher.name=resnet56", "model.name=resnet8", "data.name=cifar100",
                 f"data.root={root}", "data.download=false", f"out_dir={tmp_path / 'runs'}"])
    line = one_error_line(code, capsys.readouterr().err)
    assert f"teacher file {path} was changed" in line and "`adakd teachers fetch resnet56`" in line
    assert not (tmp_path / "runs").exists()
    line = one_error_line(main(["teachers", "verify"]), capsys.readouterr().err)
    assert "was changed after" in line
    assert main(["teachers"]) == 0 and "CHANGED since fetch (refused)" in capsys.readouterr().out
    code, out, err = fetch_cli(capsys, site, "resnet56")
    assert code == 0 and "restoring it from the archive" in err and "resnet56: fetched" in out
    assert path.read_bytes() == crd_checkpoint("resnet56") and teacher_candidate("resnet56") == path
    assert site.requests == [ARCHIVE]  # restored from the kept archive


# ------------------------------------------------------------------------------------------------ sources


def test_url_option_env_mirror_local_path_and_file_url(capsys, site, monkeypatch, tmp_path):
    site.files["mirror/teachers.tar"] = good_tar()
    monkeypatch.setenv(teachers.URL_ENV, site.url("mirror/teachers.tar"))
    assert main(["teachers", "fetch", "resnet8"]) == 0
    assert site.requests == ["mirror/teachers.tar"] and manifest()["resnet8"]["url"] == site.url("mirror/teachers.tar")
    assert main(["teachers"]) == 0 and site.url("mirror/teachers.tar") in capsys.readouterr().out
    local = tmp_path / "copied" / "cifar_teachers.tar"
    local.parent.mkdir()
    local.write_bytes(good_tar())
    for name, url in (("resnet56", str(local)), ("resnet8", local.as_uri())):
        mine = tmp_path / f"from-{name}"
        assert main(["teachers", "fetch", name, "--dir", str(mine), "--url", url]) == 0
        assert (mine / f"{name}_vanilla" / "ckpt_epoch_240.pth").is_file()
    assert local.is_file()  # the user's own copy is read in place, never moved or removed
    assert site.requests == ["mirror/teachers.tar"]


def test_refused_download_fails_within_seconds_and_says_how_to_place_the_file(capsys):
    url = refused_url("cifar_teachers.tar")
    started = time.monotonic()
    code = main(["teachers", "fetch", "resnet56", "--url", url])
    line = one_error_line(code, capsys.readouterr().err)
    assert time.monotonic() - started < 10
    assert f"cannot download {url}" in line and "adakd teachers fetch --url /path/to/cifar_teachers.tar" in line
    assert not (folder() / "resnet56_vanilla").exists() and not (folder() / "manifest.json").exists()


def test_truncated_download_is_removed_and_a_retry_succeeds(capsys, site):
    site.truncate[ARCHIVE] = 5000
    line = one_error_line(*fetch_cli(capsys, site, "resnet56")[::2])
    assert "was cut after" in line
    assert [p.name for p in (folder() / ".download").iterdir() if not p.name.endswith(".lock")] == []
    assert not (folder() / "resnet56_vanilla").exists()
    del site.truncate[ARCHIVE]
    assert fetch_cli(capsys, site, "resnet56")[0] == 0 and teacher_candidate("resnet56") is not None


def test_a_damaged_kept_archive_is_removed_so_the_next_fetch_downloads_it_anew(capsys, site):
    fetch_cli(capsys, site, "resnet56")
    kept = folder() / ".download" / "cifar_teachers.tar"
    kept.write_bytes(kept.read_bytes()[:3000])  # cut in the middle of resnet56's member
    line = one_error_line(*fetch_cli(capsys, site, "resnet8")[::2])
    assert "cannot read the teachers archive" in line and "run again to download it anew" in line
    assert not kept.exists()
    assert fetch_cli(capsys, site, "resnet8")[0] == 0 and site.requests == [ARCHIVE, ARCHIVE]


def test_torchvision_teacher_goes_to_torch_hub_with_its_hash_prefix_checked(capsys, file_server, tmp_path):
    weights = io.BytesIO()
    torch.save(models.create("resnet8", num_classes=10).state_dict(), weights)  # torchvision's files: bare state
    payload = weights.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    good, bad = f"models/resnet8-{digest[:8]}.pth", "models/resnet8-00000000.pth"
    file_server.files[good] = file_server.files[bad] = payload
    teachers.PUBLISHED["resnet8"] = PublishedTeacher("resnet8", "imagenet", 10, "torchvision", top1=61.5,
                                                     url=file_server.url(good))
    assert main(["teachers", "fetch", "resnet8"]) == 0
    path = tmp_path / "torch" / "hub" / "checkpoints" / f"resnet8-{digest[:8]}.pth"
    assert path.read_bytes() == payload and teacher_candidate("resnet8", num_classes=10) == path
    assert teacher_candidate("resnet8", num_classes=100) is None
    assert main(["teachers", "fetch", "resnet8"]) == 0 and file_server.requests == [good]
    teachers.PUBLISHED["resnet8"] = PublishedTeacher("resnet8", "imagenet", 10, "torchvision", top1=61.5,
                                                     url=file_server.url(bad))
    capsys.readouterr()
    line = one_error_line(main(["teachers", "fetch", "resnet8"]), capsys.readouterr().err)
    assert "does not start with the 00000000 its name promises" in line and "it was removed" in line
    assert not (path.parent / "resnet8-00000000.pth").exists()


def test_imagenet_teachers_read_url_and_top1_from_torchvision_offline():
    real = PublishedTeacher("resnet34", "imagenet", 1000, "torchvision", weights="ResNet34_Weights.IMAGENET1K_V1")
    assert teachers.source_url(real) == "https://download.pytorch.org/models/resnet34-b627a593.pth"
    assert teachers.published_top1(real) == 73.314
    assert teachers.hub_file(real).name == "resnet34-b627a593.pth"


# ------------------------------------------------------------------------------------------------ verify and runs


def fake_cifar_root(root: Path, teacher_path: Path, agree: int, n: int = 10) -> Path:
    """<root>/cifar-100-python with a test split whose first `agree` labels are what the teacher predicts (computed
    here by hand from the raw pixels) and the rest are not: the teacher's top-1 is agree/n exactly."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(3)
    pixels = rng.randint(0, 256, (n, 3072)).astype(np.uint8)
    model = models.load_weights(models.create("resnet56", num_classes=100), teacher_path).eval()
    x = torch.from_numpy(pixels).float().view(n, 3, 32, 32) / 255
    x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = model(x).argmax(1).tolist()
    labels = [p if i < agree else (p + 1) % 100 for i, p in enumerate(predicted)]

    def split(data, fine):
        return {b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * len(fine)}

    (folder / "test").write_bytes(pickle.dumps(split(pixels, labels), protocol=2))
    (folder / "train").write_bytes(pickle.dumps(split(pixels, labels), protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    return root


def test_verify_prints_the_score_it_computed_beside_the_published_top1(capsys, site, tmp_path):
    fetch_cli(capsys, site, "resnet56")
    root = fake_cifar_root(tmp_path / "data", folder() / "resnet56_vanilla" / "ckpt_epoch_240.pth", agree=7)
    assert main(["teachers", "verify", f"data.root={root}", "data.download=false"]) == 0
    out = capsys.readouterr().out
    assert "resnet56    cifar100 test (10 images): top-1 70.00%  published 72.34%  difference -2.34" in out
    assert "resnet8" not in out  # not fetched: not scored, and not an error without names
    line = one_error_line(main(["teachers", "verify", "resnet8", f"data.root={root}"]), capsys.readouterr().err)
    assert "teacher resnet8 is not fetched" in line and "`adakd teachers fetch resnet8`" in line


def test_distill_uses_the_fetched_teacher_without_teacher_weights(capsys, site, tmp_path):
    fetch_cli(capsys, site, "resnet56")
    root = fake_cifar_root(tmp_path / "data", folder() / "resnet56_vanilla" / "ckpt_epoch_240.pth", agree=4)
    code = main(["distill", "teacher.name=resnet56", "model.name=resnet8", "data.name=cifar100",
                 f"data.root={root}", "data.download=false", "epochs=1", "data.batch_size=10", "log.progress=false",
                 "log.tensorboard=false", f"out_dir={tmp_path / 'runs'}", "name=kd"])
    assert code == 0, capsys.readouterr().err
    log = (tmp_path / "runs" / "kd" / "log.txt").read_text()
    assert "teacher resnet56 on the cifar100 test split: top-1 40.00%" in log  # the fetched file's exact score
    assert json.loads((tmp_path / "runs" / "kd" / "teacher.json").read_text())["acc1"] == pytest.approx(40.0)


def test_a_missing_published_teacher_names_the_fetch_command():
    from adakd.engine.config import resolve
    from adakd.engine.trainer import build_model

    config = resolve(["cifar100"], None, ["task=distill", "teacher.name=resnet56"])
    with pytest.raises(Exception, match=r"teacher.weights is required.*`adakd teachers fetch resnet56`"):
        build_model(config.teacher, 100, "teacher")
    for name, classes in (("resnet56", 200), ("resnet20", 100)):  # tiny-ImageNet's 200 classes; not published
        config = resolve(["cifar100"], None, ["task=distill", f"teacher.name={name}"])
        with pytest.raises(Exception, match="teacher.weights is required") as caught:
            build_model(config.teacher, classes, "teacher")
        assert "teachers fetch" not in str(caught.value)


def test_sweep_uses_a_fetched_teacher_and_names_fetch_for_one_it_would_train(capsys, site, tmp_path):
    from adakd.experiments.launch import run_sweep

    grid = tmp_path / "grid.yaml"
    grid.write_text("presets: [cifar100]\noverrides: {distill.method: kd, model.name: resnet8, data.download: false,"
                    f" data.root: {tmp_path}}}\naxes:\n  teacher.name: [resnet56]\n")
    stream = io.StringIO()
    run_sweep(str(grid), [], out=tmp_path / "s1", dry_run=True, stream=stream)
    text = stream.getvalue()
    assert "teacher-resnet56" in text and "`adakd teachers fetch resnet56`" in text
    fetch_cli(capsys, site, "resnet56")
    stream = io.StringIO()
    run_sweep(str(grid), [], out=tmp_path / "s2", dry_run=True, stream=stream)
    assert "teacher-resnet56" not in stream.getvalue() and "1 cells (1 distill)" in stream.getvalue()
    grid.write_text(grid.read_text() + "teachers: {resnet56: required}\n")
    (folder() / "resnet56_vanilla" / "ckpt_epoch_240.pth").unlink()
    line = one_error_line(main(["sweep", str(grid), "--out", str(tmp_path / "s3")]), capsys.readouterr().err)
    assert "--teacher resnet56=PATH" in line and "`adakd teachers fetch resnet56`" in line
