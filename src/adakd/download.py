"""Downloads that are checksummed, atomic and locked: datasets, published teachers.

    path = download(url, Path("~/.cache/adakd/cifar100/cifar-100-python.tar.gz"), md5="eb9058c3...",
                    manual="unpack cifar-100-python.tar.gz into ~/.cache/adakd/cifar100")

A file already in place (with the right checksum) is used as it is, without touching the network. Otherwise one line
names the URL and the folder, a progress bar shows bytes and rate, the bytes go to a temporary file beside the
destination, and only a file whose checksum matches is renamed into place: a cut or corrupt download is removed and
never read. A lock file beside the destination makes a second process (another run, another sweep cell) wait for the
first instead of downloading into the same file; it then finds the finished file. Without network the error comes
within `timeout` seconds and says how to place the file by hand.

Used by every room (datasets, teachers), so it imports nothing of adakd.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import filelock  # a dependency of torch: one well-kept cross-platform file lock
from tqdm import tqdm

TIMEOUT_SECONDS = 20.0  # a firewall that drops packets would otherwise hang the run for minutes
USER_AGENT = "adakd (https://pypi.org/project/adakd)"


class DownloadError(RuntimeError):
    """A download failed (no network, refused, cut, wrong checksum); the message says how to place the file by
    hand."""


def cache_root() -> Path:
    """adakd's per-user cache folder: $ADAKD_CACHE, else $XDG_CACHE_HOME/adakd, else ~/.cache/adakd."""
    if os.environ.get("ADAKD_CACHE"):
        return Path(os.environ["ADAKD_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "adakd"


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest (md5, sha256, ...) of a file, read in 1 MiB blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def with_base(url: str, base: str | None) -> str:
    """`url` fetched from a mirror: its file name appended to `base` (unchanged when base is empty)."""
    if not base:
        return url
    return base.rstrip("/") + "/" + url.rsplit("/", 1)[-1]


def _checksum(md5: str | None, sha256: str | None) -> tuple[str, str] | None:
    if sha256:
        return "sha256", sha256.lower()
    if md5:
        return "md5", md5.lower()
    return None


def matches(path: Path, md5: str | None = None, sha256: str | None = None) -> bool:
    """Whether `path` is a file whose checksum (when one is given) is the expected one."""
    if not path.is_file():
        return False
    expected = _checksum(md5, sha256)
    return expected is None or file_digest(path, expected[0]) == expected[1]


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def download(url: str, dest: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None,
             manual: str = "", timeout: float | None = None, progress: bool | None = None,
             say: Callable[[str], None] | None = None) -> Path:
    """`dest`, downloaded from `url` unless already there with the expected checksum; DownloadError on failure.

    manual: how to place the file by hand (appended to every error). progress: the byte bar (None: only on a
    terminal; a summary line is printed either way). say: where the one-line notices go (default stderr).
    """
    dest = Path(dest).expanduser()
    if matches(dest, md5, sha256):
        return dest
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    hint = f" {manual}" if manual else f" Download {url} yourself and save it as {dest}."
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create the folder {dest.parent} for {dest.name} ({err.strerror or err}); give a "
                            f"writable folder.{hint}") from None
    lock = filelock.FileLock(str(dest) + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        say(f"adakd: waiting for another process downloading {dest.name} into {dest.parent} (lock {lock.lock_file})")
        lock.acquire()
    try:
        if matches(dest, md5, sha256):  # the process we waited for finished it
            return dest
        if dest.exists():
            say(f"adakd: {dest} does not match its checksum; downloading it again")
        _fetch(url, dest, _checksum(md5, sha256), hint, timeout, progress, say)
        return dest
    finally:
        lock.release()


def _fetch(url: str, dest: Path, expected: tuple[str, str] | None, hint: str, timeout: float | None,
           progress: bool | None, say: Callable[[str], None]) -> None:
    """Stream `url` into a temporary file beside `dest`, check it, and rename it into place."""
    timeout = TIMEOUT_SECONDS if timeout is None else timeout
    say(f"adakd: downloading {url} into {dest.parent}")
    started = time.monotonic()
    fd, part_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    part = Path(part_name)
    try:
        with os.fdopen(fd, "wb") as out:
            received, total = _stream(url, out, timeout, progress, dest.name, hint)
        if total is not None and received < total:
            raise DownloadError(f"the download of {url} was cut after {_size(received)} of {_size(total)}; the "
                                f"partial file was removed. Run again to retry.{hint}")
        if expected is not None:
            got = file_digest(part, expected[0])
            if got != expected[1]:
                raise DownloadError(f"{url} downloaded with {expected[0]} {got}, not the expected {expected[1]}: the "
                                    f"file is corrupt or was changed; it was removed and not used. Run again to "
                                    f"retry.{hint}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    seconds = max(time.monotonic() - started, 1e-6)
    say(f"adakd: downloaded {dest.name} ({_size(received)} in {seconds:.1f} s, {_size(received / seconds)}/s)")


def _stream(url: str, out, timeout: float, progress: bool | None, label: str, hint: str) -> tuple[int, int | None]:
    """Copy the body of `url` into `out`; (bytes received, Content-Length or None)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
                      disable=None if progress is None else not progress, leave=False) as bar:
                while True:
                    block = response.read(1 << 16)
                    if not block:
                        break
                    out.write(block)
                    received += len(block)
                    bar.update(len(block))
            return received, total
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot download {url}: the server answered HTTP {err.code} {err.reason}.{hint}") from None
    except (OSError, http.client.HTTPException) as err:  # URLError, refused, reset, timeout, a cut response
        reason = getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
        if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):  # socket.timeout is TimeoutError
            reason = f"no answer within {timeout:g} s"
        raise DownloadError(f"cannot download {url} ({reason}): no network, a firewall or a proxy in the way? "
                            f"On a machine without internet, place the file by hand.{hint}") from None


def unpack(archive: str | os.PathLike, into: str | os.PathLike, top: str) -> Path:
    """Unpack a .tar(.gz) or .zip whose contents lie under folder `top`, into `into/top`, all or nothing.

    The archive is unpacked into a temporary folder beside the destination and renamed into place, so a reader never
    sees half an archive, and a cut or corrupt archive leaves nothing. Tar members are checked by tarfile's 'data'
    filter (no absolute paths, no '..', no device files, no links leaving the folder).
    """
    archive, into = Path(archive), Path(into)
    target = into / top
    if target.exists():
        return target
    with filelock.FileLock(str(target) + ".lock"):  # a second process waits, then finds the folder in place
        if not target.exists():
            _unpack_into(archive, into, top)
    return target


def _unpack_into(archive: Path, into: Path, top: str) -> None:
    target = into / top
    staging = Path(tempfile.mkdtemp(dir=into, prefix=f".{top}.", suffix=".unpacking"))
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zipped:
                    zipped.extractall(staging)  # zipfile drops absolute paths and '..' from member names
            else:
                with tarfile.open(archive) as tarred:
                    tarred.extractall(staging, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
            raise DownloadError(f"cannot unpack {archive} ({type(err).__name__}: {err}); delete it and run again "
                                "to download it anew") from None
        if not (staging / top).is_dir():
            found = ", ".join(sorted(p.name for p in staging.iterdir())[:5]) or "nothing"
            raise DownloadError(f"{archive} does not hold a folder {top}/ (it holds {found}); delete it and run again")
        os.replace(staging / top, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
