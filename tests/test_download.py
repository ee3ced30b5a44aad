"""adakd.download against a server on 127.0.0.1: checksums, atomic files, cut / corrupt / refused downloads, locks."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from adakd.download import DownloadError, cache_root, download, unpack, with_base
from http_server import refused_url, tar_gz

PAYLOAD = os.urandom(300_000)
MD5 = hashlib.md5(PAYLOAD).hexdigest()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Files a failed download must not leave: partial files and anything but lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_downloads_once_checks_the_checksum_and_then_stays_offline(file_server, tmp_path):
    file_server.files["data/a.bin"] = PAYLOAD
    notices: list[str] = []
    path = download(file_server.url("data/a.bin"), tmp_path / "a.bin", md5=MD5, say=notices.append)
    assert path.read_bytes() == PAYLOAD
    assert notices[0] == f"adakd: downloading {file_server.url('data/a.bin')} into {tmp_path}"
    assert notices[1].startswith("adakd: downloaded a.bin (293.0 KiB in ")
    again = download(file_server.url("data/a.bin"), tmp_path / "a.bin", md5=MD5, say=notices.append)
    assert again == path and file_server.requests == ["data/a.bin"]  # the second call never asked the server
    assert leftovers(tmp_path) == ["a.bin"]


def test_sha256_is_checked_too(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    download(file_server.url("a.bin"), tmp_path / "a.bin", sha256=SHA, say=lambda _: None)
    with pytest.raises(DownloadError, match=f"sha256 {SHA}, not the expected 00"):
        download(file_server.url("a.bin"), tmp_path / "b.bin", sha256="00" * 32, say=lambda _: None)


def test_a_corrupt_download_is_removed_and_never_used(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD[:-1] + b"x"
    with pytest.raises(DownloadError) as err:
        download(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, manual="Place a.bin in the folder.",
                 say=lambda _: None)
    text = str(err.value)
    assert f"not the expected {MD5}" in text and "removed and not used" in text
    assert text.endswith("Place a.bin in the folder.")
    assert leftovers(tmp_path) == []


def test_a_cut_download_is_removed(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.truncate["a.bin"] = 100_000
    with pytest.raises(DownloadError, match=r"cut after 97.7 KiB of 293.0 KiB; the partial file was removed"):
        download(file_server.url("a.bin"), tmp_path / "a.bin", say=lambda _: None)  # no checksum: length catches it
    assert leftovers(tmp_path) == []


def test_a_wrong_file_in_place_is_downloaded_again(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    (tmp_path / "a.bin").write_bytes(b"half")
    notices: list[str] = []
    download(file_server.url("a.bin"), tmp_path / "a.bin", md5=MD5, say=notices.append)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert "does not match its checksum" in notices[0]


def test_http_error_names_the_status_and_how_to_place_the_file(file_server, tmp_path):
    file_server.status["gone.bin"] = 403
    with pytest.raises(DownloadError, match=r"answered HTTP 403 Forbidden\. Download http://127\.0\.0\.1:\d+/gone.bin "
                                            r"yourself and save it as .*gone.bin"):
        download(file_server.url("gone.bin"), tmp_path / "gone.bin", say=lambda _: None)
    assert leftovers(tmp_path) == []


def test_no_network_fails_within_seconds_naming_url_and_folder(tmp_path):
    url = refused_url("cifar.tar.gz")
    started = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "cifar.tar.gz", manual=f"Place cifar.tar.gz in {tmp_path}.", say=lambda _: None)
    assert time.monotonic() - started < 5
    text = str(err.value)
    assert text.startswith(f"cannot download {url} (") and "Connection refused" in text
    assert text.endswith(f"Place cifar.tar.gz in {tmp_path}.")
    assert leftovers(tmp_path) == []


def test_a_silent_server_times_out(tmp_path):
    import socket

    with socket.socket() as silent:  # accepts the connection (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.bin"
        with pytest.raises(DownloadError, match=r"no answer within 0.5 s"):
            download(url, tmp_path / "a.bin", timeout=0.5, say=lambda _: None)


CHILD = """
import sys
from adakd.download import download
download(sys.argv[1], sys.argv[2], md5=sys.argv[3], say=lambda text: print(text, flush=True))
"""


def test_two_processes_starting_at_once_download_once(file_server, tmp_path):
    file_server.files["a.bin"] = PAYLOAD
    file_server.chunk_size, file_server.delay = 30_000, 0.1  # about a second: the second process starts meanwhile
    env = {**os.environ, "no_proxy": "127.0.0.1"}
    command = [sys.executable, "-c", CHILD, file_server.url("a.bin"), str(tmp_path / "a.bin"), MD5]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    time.sleep(0.4)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    outputs = [process.communicate(timeout=60)[0] for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0]
    assert file_server.requests == ["a.bin"]
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert "waiting for another process downloading a.bin" in outputs[1]




def test_unpack_tar_and_zip_all_or_nothing(tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(tar_gz({"top/x.txt": b"x", "top/sub/y.txt": b"y"}))
    assert unpack(tmp_path / "a.tar.gz", tmp_path, "top") == tmp_path / "top"
    assert (tmp_path / "top" / "sub" / "y.txt").read_bytes() == b"y"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("zipped/z.txt", "z")
    (tmp_path / "b.zip").write_bytes(buffer.getvalue())
    assert (unpack(tmp_path / "b.zip", tmp_path, "zipped") / "z.txt").read_text() == "z"
    cut = tar_gz({"cut/" + str(i): os.urandom(5000) for i in range(20)})
    (tmp_path / "cut.tar.gz").write_bytes(cut[: len(cut) // 2])
    with pytest.raises(DownloadError, match="cannot unpack .*cut.tar.gz"):
        unpack(tmp_path / "cut.tar.gz", tmp_path, "cut")
    assert not (tmp_path / "cut").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".unpacking")]


def test_unpack_refuses_a_member_leaving_the_folder(tmp_path):
    (tmp_path / "evil.tar.gz").write_bytes(tar_gz({"top/ok.txt": b"ok", "../escaped.txt": b"no"}))
    (tmp_path / "inside").mkdir()
    with pytest.raises(DownloadError, match="cannot unpack"):
        unpack(tmp_path / "evil.tar.gz", tmp_path / "inside", "top")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "inside" / "top").exists()


def test_mirror_base_and_cache_root(monkeypatch, tmp_path):
    assert with_base("https://host/a/b/file.tar.gz", "http://mirror/x/") == "http://mirror/x/file.tar.gz"
    assert with_base("https://host/a/file.tar.gz", None) == "https://host/a/file.tar.gz"
    monkeypatch.setenv("ADAKD_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("ADAKD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "adakd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path("~/.cache/adakd").expanduser()


def test_the_guard_still_refuses_the_internet():
    import socket

    with pytest.raises(RuntimeError, match="may only reach a server on 127.0.0.1"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
