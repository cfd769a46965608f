"""The GloVe cache under stress, offline: racing processes, damaged archives and caches, cut and
failing connections, bad addresses.  Each test reproduces one case of the issue that asked for it
(items 6, 7, 8 and 11), served by the local 127.0.0.1 server of ``_glove_server``."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kdecli import download
from kdecli.errors import InputError, RuntimeFailure, UsageError
from kdecli.sources import glove, glove_cache
from kdecli.sources import glove_text as glove_text_format
from tests._glove_server import (
    ARCHIVE,
    TEXT50,
    TEXT100,
    GloveServer,
    expected_vectors,
    make_zip,
)

GOOD_SHA = hashlib.sha256(ARCHIVE).hexdigest()
ROOT = Path(__file__).resolve().parent.parent


def damaged(archive: bytes, member: str, line: int) -> bytes:
    """``archive`` (stored) with one digit of ``member``'s line ``line`` turned into a letter: the
    structure is sound, the CRC-32 is wrong, and the text fails to parse at that line."""
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(member)
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    text = archive[start : start + info.compress_size]
    at = (
        start
        + sum(len(t) + 1 for t in text.split(b"\n")[: line - 1])
        + text.split(b"\n")[line - 1].index(b".")
        + 1
    )
    return archive[:at] + b"x" + archive[at + 1 :]


STORED = make_zip({"glove.6B.50d.txt": TEXT50, "glove.6B.100d.txt": TEXT100}, zipfile.ZIP_STORED)
BAD_LINE = 217
DAMAGED = damaged(STORED, "glove.6B.50d.txt", BAD_LINE)


@pytest.fixture
def server():
    files = {"glove.6B.zip": ARCHIVE, "damaged.zip": DAMAGED, "stored.zip": STORED}
    with GloveServer(files) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("KDECLI_CACHE_DIR", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def waits(monkeypatch):
    """The back-off waits of ``kdecli.download``, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(download, "time", types.SimpleNamespace(sleep=slept.append))
    return slept


class Notes(download.NullProgress):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, message):
        self.notes.append(message)


def fetch(server, cache, dim=50, name="glove.6B.zip", **kwargs):
    return glove_cache.download_glove("6B", dim, cache_dir=cache, url=server.url(name), **kwargs)


def listing(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name != ".locks")


def invoke(args, **kwargs):
    from typer.testing import CliRunner

    from kdecli.cli import app  # registers every command

    return CliRunner().invoke(app, args, **kwargs)


def digest_of(path: Path) -> str:
    return (path.parent / (path.name + ".sha256")).read_text()


# --- 6: two processes at once into one cache ------------------------------------------------


def spawn(server, cache, dim, log: Path) -> subprocess.Popen:
    args = ["--corpus", "6B", "--dim", str(dim), "--cache-dir", str(cache)]
    command = [sys.executable, "-m", "kdecli", "download-glove", *args]
    return subprocess.Popen(
        [*command, "--url", server.url("glove.6B.zip")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def race(server, cache, tmp_path, dims) -> list[tuple[int, str, str]]:
    """Start one `download-glove` per dim; hold the archive back until one of them says it waits
    for the other's lock, then let it through.  (rc, stdout, stderr) of each."""
    server.hold = threading.Event()
    logs = [tmp_path / f"stderr{i}.txt" for i in range(len(dims))]
    procs = [spawn(server, cache, dim, log) for dim, log in zip(dims, logs)]
    deadline = time.monotonic() + 120
    try:
        while not any("Waiting for another kdecli process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.05)
    finally:
        server.hold.set()
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    return [(p.returncode, out, log.read_text()) for p, out, log in zip(procs, outs, logs)]


def test_two_processes_on_one_cache_entry_the_second_waits_and_finds_it_ready(
    server, cache, tmp_path
):
    results = race(server, cache, tmp_path, [50, 50])
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert all(out.strip() == str(cache / "glove.6B.50d.npy") for _, out, _ in results)
    assert server.requests == [("glove.6B.zip", None)]  # downloaded once
    waited = [err for _, _, err in results if "Waiting for another" in err]
    assert len(waited) == 1 and "already in the cache; nothing to download" in waited[0]
    np.testing.assert_array_equal(np.load(cache / "glove.6B.50d.npy"), expected_vectors(TEXT50))
    assert not list(cache.glob("*.incomplete"))


def test_two_processes_on_two_dims_share_one_download(server, cache, tmp_path):
    results = race(server, cache, tmp_path, [50, 100])
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert server.requests == [("glove.6B.zip", None)]
    assert any("Using" in err and "from the cache" in err for _, _, err in results)
    np.testing.assert_array_equal(np.load(cache / "glove.6B.50d.npy"), expected_vectors(TEXT50))
    np.testing.assert_array_equal(np.load(cache / "glove.6B.100d.npy"), expected_vectors(TEXT100))


def test_a_lock_nests_in_one_process_and_names_what_it_waits_for(tmp_path):
    target = tmp_path / "file"
    with download.cache_lock(target), download.cache_lock(target):  # nested: no deadlock
        holder = subprocess.Popen(  # another process that asks for it waits, and says so
            [sys.executable, "-c", LOCK_SCRIPT, str(target)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        waiting = holder.stdout.readline().decode()  # it cannot get past the lock while held
    assert waiting.startswith("Waiting for another kdecli process to finish with file")
    out = holder.communicate(timeout=600)[0].decode()
    assert holder.returncode == 0 and out == "acquired\n"
    assert (tmp_path / ".locks" / "file.lock").exists()


LOCK_SCRIPT = """
import sys
from pathlib import Path
from kdecli import download
class Say(download.NullProgress):
    def note(self, message):
        print(message, flush=True)
with download.cache_lock(Path(sys.argv[1]), Say()):
    print("acquired")
"""


# --- 7: a damaged cache file ----------------------------------------------------------------


def test_a_zero_byte_cache_is_an_error_to_load_and_is_rebuilt_by_download_glove(
    server, cache, monkeypatch
):
    cache.mkdir()
    (cache / "glove.6B.50d.npy").write_bytes(b"")
    (cache / "glove.6B.50d.words.txt").write_bytes(b"w\n")
    with pytest.raises(
        InputError, match="glove.6B.50d.npy cannot be used: the file is empty"
    ) as info:
        glove.resolve_glove_source("glove:6B.50d", cache_dir=cache)
    assert "download-glove --corpus 6B --dim 50" in info.value.hint
    monkeypatch.setenv("KDECLI_CACHE_DIR", str(cache))
    approx = invoke(["approx", "glove:6B.50d"])
    assert approx.exit_code == 2 and "the file is empty" in approx.stderr
    assert "unexpected" not in approx.output
    progress = Notes()
    result = fetch(server, cache, progress=progress)
    assert result.converted and any("is damaged: the file is empty" in n for n in progress.notes)
    np.testing.assert_array_equal(np.load(result.vectors_path), expected_vectors(TEXT50))


def test_a_truncated_or_overlong_cache_fails_the_cheap_check(server, cache):
    path = fetch(server, cache).vectors_path
    whole = path.read_bytes()
    for data, size in ((whole[:-4], len(whole) - 4), (whole + b"\0" * 8, len(whole) + 8)):
        path.write_bytes(data)
        with pytest.raises(InputError, match=f"it is {size:,} bytes, and its header says"):
            glove_cache.load_cache(path)
    result = fetch(server, cache)
    assert result.converted and path.read_bytes() == whole


# --- 8: damaged archives --------------------------------------------------------------------


def test_a_damaged_archive_from_the_server_never_enters_the_cache(server, cache):
    with pytest.raises(
        RuntimeFailure, match=r"is damaged \(Bad CRC-32 for file 'glove.6B.50d.txt'\)"
    ):
        fetch(server, cache, name="damaged.zip")
    assert listing(cache) == []  # nothing under the archive's name, no partial, no digest
    assert fetch(server, cache, name="stored.zip").downloaded


def test_a_damaged_partial_download_is_caught_before_the_move(server, cache):
    cache.mkdir()
    half = len(STORED) // 2
    (cache / "glove.6B.zip.incomplete").write_bytes(DAMAGED[:half])  # damaged before the cut
    with pytest.raises(RuntimeFailure, match="damaged .*Bad CRC-32.*it was removed"):
        fetch(server, cache, name="stored.zip")
    assert server.requests[-1] == ("stored.zip", f"bytes={half}-")  # it was resumed
    assert listing(cache) == []
    result = fetch(server, cache, name="stored.zip")
    assert (cache / "glove.6B.zip").read_bytes() == STORED
    np.testing.assert_array_equal(np.load(result.vectors_path), expected_vectors(TEXT50))


def test_a_cached_archive_that_fails_to_parse_where_its_crc_is_wrong_is_removed(
    server, cache, monkeypatch
):
    monkeypatch.setattr(glove_text_format, "PARSE_CHUNK_BYTES", 4096)  # parsed before the end
    cache.mkdir()
    (cache / "glove.6B.zip").write_bytes(DAMAGED)  # e.g. left by an older kdecli, unchecked
    with pytest.raises(RuntimeFailure, match="corrupt .*Bad CRC-32.*it was removed") as info:
        fetch(server, cache)
    assert f"line {BAD_LINE}" in info.value.message and info.value.hint.startswith("Run again")
    assert listing(cache) == []
    assert fetch(server, cache).downloaded  # the next run downloads it anew


def test_a_parse_error_in_a_sound_archive_keeps_the_archive(server, cache):
    cache.mkdir()
    lines = TEXT50.split(b"\n")
    bad_text = b"\n".join([*lines[:10], b"w10 1.5 2.5", *lines[11:]])  # line 11: two numbers
    (cache / "glove.6B.zip").write_bytes(make_zip({"glove.6B.50d.txt": bad_text}))
    with pytest.raises(InputError, match="glove.6B.50d.txt, line 11: expected a word and 50"):
        fetch(server, cache)
    assert listing(cache) == ["glove.6B.zip"]


def test_glove_input_from_a_damaged_zip_names_the_damage(tmp_path):
    path = tmp_path / "glove.6B.zip"
    path.write_bytes(DAMAGED)
    with pytest.raises(InputError, match="is corrupt .*Bad CRC-32"):
        glove.resolve_glove_source(f"glove:{path}#50")


def test_a_wrong_sha256_never_deletes_an_archive_that_matched(server, cache):
    fetch(server, cache)
    archive = cache / "glove.6B.zip"
    assert digest_of(archive) == f"{GOOD_SHA}  glove.6B.zip\n"
    served = len(server.requests)
    for force in (False, True):
        with pytest.raises(RuntimeFailure, match="checksum mismatch.*left as it was"):
            fetch(server, cache, dim=100, sha256="0" * 64, force=force)
        assert archive.read_bytes() == ARCHIVE and digest_of(archive).startswith(GOOD_SHA)
    assert len(server.requests) == served + 2
    result = fetch(server, cache, dim=100, sha256=GOOD_SHA)  # the recorded digest: no download
    assert result.converted and not result.downloaded and len(server.requests) == served + 2


def test_a_failed_force_leaves_the_previous_cache_as_it_was(server, cache):
    before = fetch(server, cache)
    saved = {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    server.files["glove.6B.zip"] = DAMAGED
    with pytest.raises(RuntimeFailure, match="damaged"):
        fetch(server, cache, force=True)
    assert {p.name: p.read_bytes() for p in cache.iterdir() if p.is_file()} == saved
    assert not glove_cache.download_glove("6B", 50, cache_dir=cache, verify=True).converted
    np.testing.assert_array_equal(np.load(before.vectors_path), expected_vectors(TEXT50))


# --- 11: digests, retries, addresses --------------------------------------------------------


def test_every_cache_file_carries_its_digest_in_sha256sum_format(server, cache):
    fetch(server, cache)
    for name in ("glove.6B.zip", "glove.6B.50d.npy", "glove.6B.50d.words.txt"):
        digest = hashlib.sha256((cache / name).read_bytes()).hexdigest()
        assert digest_of(cache / name) == f"{digest}  {name}\n"
    assert sorted(p.name for p in (cache / ".locks").iterdir()) == [
        "glove.6B.50d.npy.lock",
        "glove.6B.zip.lock",
    ]


def test_an_altered_cache_loads_but_verify_finds_it_and_rebuilds_it(server, cache):
    path = fetch(server, cache).vectors_path
    data = bytearray(path.read_bytes())
    data[-4:] = np.float32(1.0).tobytes()  # still finite: no cheap check can tell
    path.write_bytes(bytes(data))
    assert glove.resolve_glove_source(f"glove:{path}")[-1, -1] == 1.0  # loads silently
    progress = Notes()
    result = glove_cache.download_glove("6B", 50, cache_dir=cache, verify=True, progress=progress)
    assert result.converted and not result.downloaded
    assert any("glove.6B.50d.npy has sha256" in n and "rebuilding it" in n for n in progress.notes)
    np.testing.assert_array_equal(np.load(path), expected_vectors(TEXT50))
    again = glove_cache.download_glove("6B", 50, cache_dir=cache, verify=True)
    assert not again.converted
    assert [p.name for p in again.verified] == [
        "glove.6B.50d.npy",
        "glove.6B.50d.words.txt",
        "glove.6B.zip",
    ]


def test_verify_removes_an_altered_archive_and_rebuilds_a_cache_without_digests(server, cache):
    fetch(server, cache)
    middle = len(ARCHIVE) // 2
    (cache / "glove.6B.zip").write_bytes(
        ARCHIVE[:middle] + bytes([ARCHIVE[middle] ^ 1]) + ARCHIVE[middle + 1 :]
    )
    (cache / "glove.6B.50d.words.txt.sha256").unlink()
    progress = Notes()
    result = fetch(server, cache, verify=True, progress=progress)
    assert any("glove.6B.zip is damaged" in n and "it was removed" in n for n in progress.notes)
    assert any("words.txt has no recorded digest" in n for n in progress.notes)
    assert result.downloaded and result.converted
    assert (cache / "glove.6B.zip").read_bytes() == ARCHIVE


def test_the_command_verifies(server, cache):
    args = ["download-glove", "--corpus", "6B", "--dim", "50", "--cache-dir", str(cache)]
    assert invoke([*args, "--url", server.url("glove.6B.zip")]).exit_code == 0
    (cache / "glove.6B.50d.words.txt").write_bytes(b"altered\n")
    checked = invoke([*args, "--verify"])
    assert checked.exit_code == 0, checked.output
    assert "glove.6B.50d.words.txt has sha256" in checked.stderr
    assert "Converted 300 vectors" in checked.stderr
    assert checked.stdout.strip() == str(cache / "glove.6B.50d.npy")
    clean = invoke([*args, "--verify"])
    assert "Verified glove.6B.50d.npy and glove.6B.50d.words.txt" in clean.stderr
    assert "nothing to download" in clean.stderr


def test_a_cut_connection_is_retried_and_resumed(server, cache, waits):
    server.cut_after, server.cuts = 60_000, 100  # every response breaks off after 60 kB
    progress = Notes()
    result = fetch(server, cache, progress=progress)
    tries = -(-len(ARCHIVE) // 60_000)
    assert [r[1] for r in server.requests] == [None] + [
        f"bytes={60_000 * i}-" for i in range(1, tries)
    ]
    assert waits == [1.0] * (tries - 1)  # each try got further, so the count starts again
    assert any("retry 1 of 5 in 1 s" in n for n in progress.notes)
    np.testing.assert_array_equal(np.load(result.vectors_path), expected_vectors(TEXT50))


def test_retries_back_off_and_give_up_when_no_try_gets_further(server, cache, waits):
    server.mode, server.cut_after, server.cuts = "norange", 50_000, 100  # restarts, never ends
    with pytest.raises(RuntimeFailure, match="5 retries in a row got no further") as info:
        fetch(server, cache)
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0] and len(server.requests) == 6
    assert "resume" in info.value.hint and (cache / "glove.6B.zip.incomplete").exists()


def test_server_errors_are_retried_and_client_errors_are_not(server, cache, waits):
    server.statuses = [503, 502]
    assert fetch(server, cache).downloaded and waits == [1.0, 2.0]
    served = len(server.requests)
    with pytest.raises(RuntimeFailure, match="HTTP 404"):
        fetch(server, cache, name="missing.zip", force=True)
    assert len(server.requests) == served + 1 and waits == [1.0, 2.0]


@pytest.mark.parametrize(
    "url", ["ftp://example.org/glove.6B.zip", "foo://x", "/tmp/glove.6B.zip", "http://"]
)
def test_an_unknown_url_scheme_is_a_usage_error(cache, url):
    with pytest.raises(UsageError, match="give an http:// or https:// address"):
        glove_cache.download_glove("6B", 50, cache_dir=cache, url=url)
    assert not cache.exists()  # refused before anything was made
    result = invoke(["download-glove", "--corpus", "6B", "--dim", "50", "--url", url])
    assert result.exit_code == 2 and "give an http:// or https:// address" in result.stderr


def test_user_text_in_notes_is_not_markup(server, tmp_path):
    cache = tmp_path / "[red]cache[/red]"
    args = ["download-glove", "--corpus", "6B", "--dim", "50", "--cache-dir", str(cache)]
    assert invoke([*args, "--url", server.url("glove.6B.zip")]).exit_code == 0
    (cache / "glove.6B.50d.npy").write_bytes(b"")
    result = invoke(args)
    assert result.exit_code == 0 and f"{cache}/glove.6B.50d.npy is damaged" in result.stderr
