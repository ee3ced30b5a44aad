"""The published teachers: their table, `fetch` into the folder layout $ADAKD_TEACHERS reads, and the manifest that
guards the fetched files.

    fetch(["resnet56"])                  # mdistiller's cifar_teachers.tar -> <dir>/resnet56_vanilla/ckpt_epoch_240.pth
    locate(PUBLISHED["resnet56"])        # (path, state): state "present", "changed" or "absent"
    candidate("resnet56", num_classes=100)  # the file a distillation uses when teacher.weights is not given

CIFAR-100 teachers: the CRD benchmark's, as the field shares them today (the CRD server is gone; mdistiller's GitHub
release asset `cifar_teachers.tar` holds `cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth`, each the CRD
`train_teacher.py` dict {'epoch', 'model', 'accuracy', 'optimizer'}). Each member is written beside its place, loaded
strictly into the zoo model, hashed, and only then renamed into place and recorded in `<dir>/manifest.json` (SHA-256,
size, source URL); a file whose hash later differs from the manifest is refused. ImageNet teachers are torchvision's
pretrained weights (the dkd-imagenet grid and SAKD's Table VI use them), kept where torchvision keeps them
(torch.hub's checkpoints folder) and checked against the hash prefix in their file name, as torch.hub does.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import filelock
import torch

from adakd.download import cache_root, download, file_digest
from adakd.models.checkpoint import CheckpointError, load_state_dict_file, load_weights
from adakd.models.registry import create
from adakd.registry import suggestions

ARCHIVE_URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
URL_ENV = "ADAKD_TEACHERS_URL"  # a mirror of the archive: an https:// or file:// URL, or a local path
DIR_ENV = "ADAKD_TEACHERS"
ARCHIVE_TOP = "cifar_teachers"
CHECKPOINT_NAME = "ckpt_epoch_240.pth"  # the CRD benchmark's last checkpoint of a 240-epoch run
MANIFEST_NAME = "manifest.json"
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's rule: 'resnet34-b627a593.pth' starts its SHA-256


class TeacherError(CheckpointError):
    """A published teacher cannot be fetched, placed or used (unknown name, changed file, archive without it)."""


@dataclass(frozen=True)
class PublishedTeacher:
    """One published teacher: a zoo model, the data it was trained on, its published top-1 and where it comes from.

    source: "archive" (a member of the teachers archive) or "torchvision" (`weights`, a torchvision enum name).
    top1: the publisher's number (a torchvision teacher reads it from its enum when None). url: where it is
    downloaded from, when not the archive's source (--url, $ADAKD_TEACHERS_URL, mdistiller's) or the enum's.
    """

    name: str
    dataset: str
    num_classes: int
    source: str
    top1: float | None = None
    weights: str = ""
    url: str = ""

    @property
    def relative(self) -> str:
        """Where an archive teacher lies under the teachers folder (the layout $ADAKD_TEACHERS reads)."""
        return f"{self.name}_vanilla/{CHECKPOINT_NAME}"

    @property
    def member(self) -> str:
        """Its path inside mdistiller's archive."""
        return f"{ARCHIVE_TOP}/{self.relative}"


def _cifar(name: str, top1: float) -> PublishedTeacher:
    return PublishedTeacher(name, "cifar100", 100, "archive", top1)


# Top-1 on the CIFAR-100 test split as the CRD benchmark's README reports these very files (mdistiller uses them
# unchanged). tiny-ImageNet: mdistiller reads a ResNet18 from tiny_imagenet_teachers/ResNet18_vanilla/ti_res18, a
# folder its README does not say cifar_teachers.tar holds, and adakd's zoo has no CIFAR-style ResNet18: not listed.
PUBLISHED: dict[str, PublishedTeacher] = {t.name: t for t in (
    _cifar("resnet56", 72.34), _cifar("resnet110", 74.31), _cifar("resnet32x4", 79.42), _cifar("wrn_40_2", 75.61),
    _cifar("vgg13", 74.64), _cifar("ResNet50", 79.34),
    PublishedTeacher("resnet34", "imagenet", 1000, "torchvision", weights="ResNet34_Weights.IMAGENET1K_V1"),
    PublishedTeacher("resnet50", "imagenet", 1000, "torchvision", weights="ResNet50_Weights.IMAGENET1K_V1"),
)}


# ------------------------------------------------------------------------------------------------ table and places


def get(name: str) -> PublishedTeacher:
    """The published teacher `name`; TeacherError naming the known ones (and the closest) otherwise."""
    if name in PUBLISHED:
        return PUBLISHED[name]
    close = suggestions(name, list(PUBLISHED), n=2)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise TeacherError(f"{name!r} is not a published teacher adakd knows{hint} (known: {', '.join(PUBLISHED)}); "
                       "for another teacher train one with `adakd train` and pass teacher.weights=PATH")


def published_top1(teacher: PublishedTeacher) -> float | None:
    """The top-1 (percent) its publisher reports: the table's, or torchvision's own metric for its weights."""
    if teacher.top1 is not None or teacher.source != "torchvision":
        return teacher.top1
    metrics = _torchvision_weights(teacher).meta.get("_metrics", {})
    return next((float(m["acc@1"]) for m in metrics.values() if "acc@1" in m), None)


def source_url(teacher: PublishedTeacher, archive_url: str | None = None) -> str:
    """Where it is downloaded from: the archive (--url, $ADAKD_TEACHERS_URL, mdistiller's release) or torchvision."""
    if teacher.source == "archive":
        return archive_url or os.environ.get(URL_ENV) or teacher.url or ARCHIVE_URL
    return teacher.url or _torchvision_weights(teacher).url


def _torchvision_weights(teacher: PublishedTeacher):
    import torchvision.models  # late: listing archive teachers needs no torchvision import

    return torchvision.models.get_weight(teacher.weights)


def teachers_dir(directory: str | os.PathLike | None = None) -> Path:
    """The folder fetched teachers go to: `directory`, else $ADAKD_TEACHERS, else <adakd cache>/teachers."""
    if directory:
        return Path(directory).expanduser()
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser()
    return cache_root() / "teachers"


def search_dirs(directory: str | os.PathLike | None = None) -> list[Path]:
    """Folders a teacher is looked for in, in order: `directory`, $ADAKD_TEACHERS, the cache's teachers folder."""
    found: list[Path] = []
    for folder in (directory, os.environ.get(DIR_ENV), cache_root() / "teachers"):
        if folder and Path(folder).expanduser() not in found:
            found.append(Path(folder).expanduser())
    return found


def hub_file(teacher: PublishedTeacher) -> Path:
    """Where torchvision keeps a torchvision teacher's weights (torch.hub's checkpoints folder, as torchvision)."""
    name = urllib.parse.urlparse(source_url(teacher)).path.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


# ------------------------------------------------------------------------------------------------ manifest


def read_manifest(directory: Path) -> dict:
    """The manifest of a teachers folder ({'teachers': {name: record}}; empty when there is none)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return {"teachers": {}}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TeacherError(f"{path} cannot be read ({type(err).__name__}: {err}); delete it and run `adakd teachers "
                           "fetch` again to rewrite it") from None
    if not isinstance(values, dict) or not isinstance(values.get("teachers"), dict):
        raise TeacherError(f"{path} is not an adakd teachers manifest (no 'teachers' mapping); delete it and run "
                           "`adakd teachers fetch` again to rewrite it")
    return values


def _record(directory: Path, name: str, record: dict | None) -> None:
    """Set (or with None remove) one teacher's manifest record, under a lock so two fetches keep both records."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / MANIFEST_NAME
    with filelock.FileLock(str(path) + ".lock"):
        values = read_manifest(directory)
        if record is None:
            values["teachers"].pop(name, None)
        else:
            values["teachers"][name] = record
        values["about"] = ("written by `adakd teachers fetch`: each file's SHA-256 when it was fetched; a file "
                           "that no longer matches is refused")
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".manifest.", suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump(values, out, indent=2, sort_keys=True)
            out.write("\n")
        os.replace(temporary, path)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_of(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) so a sweep's many lookups hash a teacher once."""
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path, "sha256")
    return _DIGESTS[key]


def _changed(path: Path, name: str, expected: str, where: str) -> TeacherError:
    got = sha256_of(path)
    return TeacherError(
        f"teacher file {path} was changed after `adakd teachers fetch` wrote it: its SHA-256 is {got[:16]}..., "
        f"{where} records {expected[:16]}...; it is not used. Run `adakd teachers fetch {name}` to restore the "
        f"published file, or pass your own file as teacher.weights=PATH")


def check(path: Path, name: str, folder: Path | None = None) -> Path:
    """`path` when it matches what was fetched: its record in `folder`'s manifest, or for a torchvision teacher the
    hash prefix in its file name; TeacherError when it was changed. A file nothing records is returned as it is (the
    user's own file)."""
    if folder is not None:
        record = read_manifest(folder)["teachers"].get(name)
        if record and record.get("file") == path.relative_to(folder).as_posix() and record.get("sha256"):
            if sha256_of(path) != record["sha256"]:
                raise _changed(path, name, record["sha256"], str(folder / MANIFEST_NAME))
        return path
    prefix = HASH_IN_NAME.search(path.name)
    if prefix and not sha256_of(path).startswith(prefix.group(1)):
        raise _changed(path, name, prefix.group(1), "its file name (torchvision's hash prefix)")
    return path


def _places(teacher: PublishedTeacher, directory: str | os.PathLike | None) -> list[tuple[Path, Path | None]]:
    if teacher.source == "torchvision":
        return [(hub_file(teacher), None)]
    return [(folder / teacher.relative, folder) for folder in search_dirs(directory)]


def find(teacher: PublishedTeacher, directory: str | os.PathLike | None = None) -> Path | None:
    """The file of a published teacher on this machine (None: not fetched); TeacherError when it was changed."""
    for path, folder in _places(teacher, directory):
        if path.is_file():
            return check(path, teacher.name, folder)
    return None


def locate(teacher: PublishedTeacher, directory: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(path, state) of a published teacher on this machine: 'present', 'changed' (refused) or 'absent'."""
    for path, folder in _places(teacher, directory):
        if path.is_file():
            try:
                check(path, teacher.name, folder)
            except TeacherError:
                return path, "changed"
            return path, "present"
    return None, "absent"


def candidate(name: str, num_classes: int | None = None) -> Path | None:
    """The teacher file a run uses when teacher.weights is not given: <dir>/<name>_vanilla/ckpt_epoch_240.pth in
    $ADAKD_TEACHERS, then in the cache's teachers folder, then a fetched torchvision teacher; None if none is there.

    A fetched file for another number of classes (a CIFAR-100 teacher for a tiny-ImageNet run) is passed over; a
    fetched file whose hash differs from its manifest raises TeacherError.
    """
    teacher = PUBLISHED.get(name)
    for folder in search_dirs():
        path = folder / f"{name}_vanilla" / CHECKPOINT_NAME
        if not path.is_file():
            continue
        record = read_manifest(folder)["teachers"].get(name) or {}
        if num_classes is not None and record.get("num_classes") not in (None, num_classes):
            continue
        return check(path, name, folder)
    if teacher is not None and teacher.source == "torchvision" and num_classes in (None, teacher.num_classes):
        path = hub_file(teacher)
        if path.is_file():
            return check(path, name)
    return None


def fetch_hint(name: str, num_classes: int | None = None) -> str:
    """', or fetch the published one with `adakd teachers fetch NAME`' for a published teacher of `num_classes`
    classes ('' otherwise: a CIFAR-100 teacher does not help a tiny-ImageNet run)."""
    teacher = PUBLISHED.get(name)
    if teacher is None or num_classes not in (None, teacher.num_classes):
        return ""
    return f", or fetch the published one ({teacher.dataset}) with `adakd teachers fetch {name}`"


# ------------------------------------------------------------------------------------------------ fetch


@dataclass
class Fetched:
    """What fetch did for one teacher: its file, and whether it was already in place."""

    name: str
    path: Path
    already: bool


def fetch(names: Iterable[str], directory: str | os.PathLike | None = None, url: str | None = None,
          progress: bool | None = None, say: Callable[[str], None] | None = None) -> list[Fetched]:
    """Fetch published teachers: archive ones into `directory` (see teachers_dir), torchvision ones into torch.hub's
    folder; each strict-loaded into its zoo model before it is placed. Teachers already in place are not fetched
    again; the archive is downloaded once (and removed once every archive teacher is unpacked)."""
    wanted = [get(name) for name in dict.fromkeys(names)]
    folder = teachers_dir(directory)
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))  # notices; the caller prints results
    done: list[Fetched] = []
    archived = [t for t in wanted if t.source == "archive"]
    missing = []
    for teacher in archived:
        path = folder / teacher.relative
        state = _state_in(folder, teacher)
        if state == "present":
            done.append(Fetched(teacher.name, path, True))
        else:
            if state == "changed":
                say(f"adakd: {path} no longer matches {folder / MANIFEST_NAME}; restoring it from the archive")
            missing.append(teacher)
    if missing:
        done += _from_archive(missing, folder, source_url(missing[0], url), progress, say)
    for teacher in wanted:
        if teacher.source == "torchvision":
            done.append(_from_torchvision(teacher, progress, say))
    order = [t.name for t in wanted]
    return sorted(done, key=lambda f: order.index(f.name))


def _state_in(folder: Path, teacher: PublishedTeacher) -> str:
    path = folder / teacher.relative
    record = read_manifest(folder)["teachers"].get(teacher.name)
    if not path.is_file() or not record:
        return "absent"
    return "present" if sha256_of(path) == record.get("sha256") else "changed"


def _local_archive(url: str) -> Path | None:
    """The archive as a file on this machine when `url` is a local path or a file:// URL (None: download it)."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a drive letter reads as a scheme
        return Path(url).expanduser()
    return None


def _from_archive(wanted: list[PublishedTeacher], folder: Path, url: str, progress: bool | None,
                  say: Callable[[str], None]) -> list[Fetched]:
    """Download (or open) the archive once and place each wanted member; one error naming every failure."""
    local = _local_archive(url)
    manual = (f"Download {url} on a machine with internet (a browser, or `curl -LO {url}`), copy it here and run "
              f"`adakd teachers fetch --url /path/to/{url.rsplit('/', 1)[-1]}` (or set {URL_ENV} to that path)")
    if local is not None:
        if not local.is_file():
            raise TeacherError(f"teachers archive {local} does not exist (from --url or ${URL_ENV}); give the path "
                               f"of cifar_teachers.tar, or an http(s):// URL")
        archive = local
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TeacherError(f"cannot create the teachers folder {folder} ({err.strerror or err}); give a "
                               "writable --dir") from None
        name = urllib.parse.urlparse(url).path.rsplit("/", 1)[-1] or "cifar_teachers.tar"
        archive = download(url, folder / ".download" / name, manual=manual, progress=progress, say=say)
    try:
        with tarfile.open(archive) as tar:
            members = {m.name.lstrip("./"): m for m in tar.getmembers() if m.isfile()}
            placed, failures = [], []
            for teacher in wanted:
                member = members.get(teacher.member) or next(
                    (m for path, m in members.items() if path.endswith("/" + teacher.relative)), None)
                if member is None:
                    held = sorted({p.split("/")[-2] for p in members if p.endswith(CHECKPOINT_NAME)})
                    failures.append(f"{teacher.name}: {archive} has no {teacher.member} (it holds "
                                    f"{', '.join(held[:8]) or 'no <name>_vanilla/' + CHECKPOINT_NAME})")
                    continue
                try:
                    placed.append(_place(tar, member, teacher, folder, url))
                except CheckpointError as err:
                    failures.append(f"{teacher.name}: {err}")
    except (tarfile.TarError, EOFError, OSError) as err:
        if local is None:
            archive.unlink(missing_ok=True)
        fix = "it was removed; run again to download it anew" if local is None else "give an intact copy"
        raise TeacherError(f"cannot read the teachers archive {archive} ({type(err).__name__}: {err}); {fix}") \
            from None
    for item in placed:
        say(f"adakd: teacher {item.name} -> {item.path}")
    if local is None and all(_state_in(folder, t) == "present" for t in PUBLISHED.values() if t.source == "archive"):
        archive.unlink(missing_ok=True)  # every teacher it holds is unpacked: keeping it would double the disk used
    if failures:
        kept = f" ({', '.join(p.name for p in placed)} fetched)" if placed else ""
        raise TeacherError(f"{'; '.join(failures)}. Not installed{kept}; check that --url / ${URL_ENV} is "
                           f"mdistiller's cifar_teachers.tar ({ARCHIVE_URL})")
    return placed


def _scalar(value: object) -> float | int | None:
    """A number stored in a checkpoint (a tensor, a numpy or Python scalar) as a plain number, else None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            return value.item()  # numpy scalar
        except (TypeError, ValueError):
            return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _place(tar: tarfile.TarFile, member: tarfile.TarInfo, teacher: PublishedTeacher, folder: Path,
           url: str) -> Fetched:
    """Write one member beside its place, strict-load it, then rename it into place and record it."""
    target = folder / teacher.relative
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part.pth")
    part = Path(temporary)
    try:
        digest = hashlib.sha256()
        source = tar.extractfile(member)
        if source is None:
            raise TeacherError(f"{member.name} is not a regular file")
        with os.fdopen(fd, "wb") as out, source:
            for block in iter(lambda: source.read(1 << 20), b""):
                out.write(block)
                digest.update(block)
        model = create(teacher.name, num_classes=teacher.num_classes)
        try:
            load_weights(model, part, model_name=teacher.name)
        except CheckpointError as err:  # name the member, not the temporary file it was written to
            raise CheckpointError(str(err).replace(str(part), f"{tar.name}:{member.name}")) from None
        raw = load_state_dict_file(part)
        details = {key: _scalar(raw.get(key)) for key in ("epoch", "accuracy")} if isinstance(raw, dict) else {}
        record = {"file": teacher.relative, "sha256": digest.hexdigest(), "size": part.stat().st_size,
                  "url": url, "member": member.name, "dataset": teacher.dataset, "num_classes": teacher.num_classes,
                  "model": teacher.name, "published_top1": teacher.top1, "fetched": time.strftime("%Y-%m-%d %H:%M:%S"),
                  **{f"file_{key}": value for key, value in details.items() if value is not None}}
        os.replace(part, target)
        _record(folder, teacher.name, record)
        return Fetched(teacher.name, target, False)
    finally:
        part.unlink(missing_ok=True)


def _from_torchvision(teacher: PublishedTeacher, progress: bool | None, say: Callable[[str], None]) -> Fetched:
    """torchvision's weight file in torch.hub's folder (downloaded once), its hash prefix checked, strict-loaded."""
    url, path = source_url(teacher), hub_file(teacher)
    prefix = HASH_IN_NAME.search(path.name)
    if path.is_file():
        if prefix is None or sha256_of(path).startswith(prefix.group(1)):
            return Fetched(teacher.name, path, True)
        say(f"adakd: {path} does not start with the SHA-256 {prefix.group(1)} its name promises; downloading it again")
        path.unlink()
    manual = (f"Download {url} on a machine with internet and place it as {path} (torch.hub's folder: "
              "$TORCH_HOME/hub/checkpoints, which torchvision reads too)")
    download(url, path, manual=manual, progress=progress, say=say)
    if prefix is not None and not sha256_of(path).startswith(prefix.group(1)):
        got = sha256_of(path)
        path.unlink(missing_ok=True)
        raise TeacherError(f"{url} downloaded with SHA-256 {got[:16]}..., which does not start with the "
                           f"{prefix.group(1)} its name promises: the file is corrupt or was changed; it was removed. "
                           f"Run again to retry. {manual}")
    try:
        load_weights(create(teacher.name, num_classes=teacher.num_classes), path, model_name=teacher.name)
    except CheckpointError as err:
        path.unlink(missing_ok=True)
        raise TeacherError(f"{teacher.name}: {err} (the file was removed)") from None
    say(f"adakd: teacher {teacher.name} -> {path}")
    return Fetched(teacher.name, path, False)


# ------------------------------------------------------------------------------------------------ listing


def listing(directory: str | os.PathLike | None = None) -> str:
    """The table `adakd teachers` prints: name, dataset, published top-1, whether and where present, source."""
    rows = [("teacher", "dataset", "top-1", "here", "source")]
    for teacher in PUBLISHED.values():
        path, state = locate(teacher, directory)
        top1 = published_top1(teacher)
        here = {"present": str(path), "changed": f"CHANGED since fetch (refused): {path}", "absent": "-"}[state]
        rows.append((teacher.name, teacher.dataset, f"{top1:.2f}" if top1 is not None else "?", here,
                     source_url(teacher)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.append(f"\nfetched into {teachers_dir(directory)} (--dir, else ${DIR_ENV}, else the adakd cache); ImageNet "
                 f"teachers into torch.hub's {Path(torch.hub.get_dir()) / 'checkpoints'}. "
                 "`adakd teachers fetch NAME` (or --all) fetches, `adakd teachers verify` scores them; a distillation "
                 "with teacher.name=NAME and no teacher.weights uses the fetched file.")
    return "\n".join(lines)
