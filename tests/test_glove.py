"""GloVe end to end, offline: a local 127.0.0.1 server serves small archives in the Stanford layout."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdecli import download
from kdecli.errors import InputError, RuntimeFailure, UsageError
from kdecli.sources import glove, glove_cache
from kdecli.sources import (
    glove_text as text_format,  # `glove_text` is the test server's text writer
)
from tests._glove_server import (
    ARCHIVE,
    ROWS,
    TEXT50,
    TEXT100,
    GloveServer,
    expected_vectors,
    make_vectors,
    make_zip,
)

WORDS50 = make_vectors(ROWS, 50, seed=0)[1]


@pytest.fixture
def server():
    with GloveServer({"glove.6B.zip": ARCHIVE, "junk.zip": os.urandom(len(ARCHIVE))}) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("KDECLI_CACHE_DIR", raising=False)
    return tmp_path / "cache"


def fetch(server, cache, dim=50, name="glove.6B.zip", **kwargs):
    return glove_cache.download_glove("6B", dim, cache_dir=cache, url=server.url(name), **kwargs)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.incomplete"))


def listing(folder: Path) -> list[str]:
    """The files in a cache folder, but for its lock files (``.locks/``, kept as locks must be)."""
    return sorted(name for name in os.listdir(folder) if name != ".locks")


# --- download -------------------------------------------------------------------------------


def test_download_converts_and_matches_the_oracle(server, cache):
    result = fetch(server, cache)
    assert result.downloaded and result.converted and result.rows == ROWS
    assert result.vectors_path == cache / "glove.6B.50d.npy"
    vectors = np.load(result.vectors_path)
    assert vectors.dtype == np.float32 and vectors.shape == (ROWS, 50)
    np.testing.assert_array_equal(vectors, expected_vectors(TEXT50))
    assert glove_cache.load_words(result.vectors_path) == WORDS50
    assert (cache / "glove.6B.zip").read_bytes() == ARCHIVE
    assert leftovers(cache) == []


def test_second_run_downloads_nothing_and_another_dim_reuses_the_archive(server, cache):
    fetch(server, cache)
    served = len(server.requests)
    again = fetch(server, cache)
    assert not again.downloaded and not again.converted and len(server.requests) == served
    other = fetch(server, cache, dim=100)
    assert other.converted and not other.downloaded and len(server.requests) == served
    np.testing.assert_array_equal(np.load(other.vectors_path), expected_vectors(TEXT100))


def test_force_downloads_again(server, cache):
    fetch(server, cache)
    served = len(server.requests)
    assert fetch(server, cache, force=True).downloaded and len(server.requests) == served + 1


def test_resume_after_a_cut_connection(server, cache):
    server.cut_after, server.cuts = 60_000, 1
    with pytest.raises(RuntimeFailure, match="broke off after 60,000 of") as info:
        fetch(server, cache, retries=0)  # no retries: the next run resumes
    assert "resume" in info.value.hint
    part = cache / "glove.6B.zip.incomplete"
    assert part.stat().st_size == 60_000 and not (cache / "glove.6B.zip").exists()
    assert not (cache / "glove.6B.50d.npy").exists()
    result = fetch(server, cache)
    assert server.requests[-1] == ("glove.6B.zip", "bytes=60000-")
    assert (cache / "glove.6B.zip").read_bytes() == ARCHIVE
    np.testing.assert_array_equal(np.load(result.vectors_path), expected_vectors(TEXT50))
    assert leftovers(cache) == []


def test_a_server_without_range_support_starts_over_cleanly(server, cache):
    server.mode, server.cut_after, server.cuts = "norange", 50_000, 1
    with pytest.raises(RuntimeFailure):
        fetch(server, cache, retries=0)
    fetch(server, cache)
    assert server.requests[-1] == ("glove.6B.zip", "bytes=50000-")  # asked, got 200, rewrote
    assert (cache / "glove.6B.zip").read_bytes() == ARCHIVE


def test_a_complete_partial_file_is_verified_without_a_transfer(server, cache):
    cache.mkdir()
    (cache / "glove.6B.zip.incomplete").write_bytes(ARCHIVE)  # e.g. killed during verification
    fetch(server, cache)
    assert (cache / "glove.6B.zip").read_bytes() == ARCHIVE and leftovers(cache) == []


def test_checksum_mismatch_removes_the_file(server, cache):
    with pytest.raises(RuntimeFailure, match="checksum mismatch"):
        fetch(server, cache, sha256="0" * 64)
    assert listing(cache) == []
    good = hashlib.sha256(ARCHIVE).hexdigest()
    assert fetch(server, cache, sha256=good.upper()).converted


def test_a_malformed_sha256_is_a_usage_error(server, cache):
    with pytest.raises(UsageError, match="64 hexadecimal digits"):
        fetch(server, cache, sha256="abc")


def test_a_missing_dimension_lists_the_dims_present(server, cache):
    with pytest.raises(InputError, match=r"glove\.6B\.200d\.txt.*dims it holds: 50, 100"):
        fetch(server, cache, dim=200)
    assert not list(cache.glob("*.npy"))
    with pytest.raises(UsageError, match="dims 50, 100, 200, 300; got --dim 25"):
        fetch(server, cache, dim=25)


def test_a_download_that_is_no_zip_is_removed(server, cache):
    with pytest.raises(RuntimeFailure, match="not a valid zip"):
        fetch(server, cache, name="junk.zip")
    assert listing(cache) == []


def test_a_corrupt_member_in_the_cached_archive_is_removed(server, cache):
    cache.mkdir()
    data = bytearray(ARCHIVE)
    info = zipfile.ZipFile(io.BytesIO(ARCHIVE)).getinfo("glove.6B.50d.txt")
    data[info.header_offset + 200 : info.header_offset + 400] = os.urandom(
        200
    )  # inside the deflate stream
    (cache / "glove.6B.zip").write_bytes(bytes(data))
    with pytest.raises(RuntimeFailure, match="corrupt"):
        fetch(server, cache)
    assert listing(cache) == []  # no archive, no half-written cache, no .incomplete


def test_keyboard_interrupt_keeps_the_partial_for_resume(server, cache, monkeypatch):
    monkeypatch.setattr(download, "CHUNK_BYTES", 16_384)

    class Interrupting(download.NullProgress):
        def advance(self, amount):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(server, cache, progress=Interrupting())
    assert (cache / "glove.6B.zip.incomplete").stat().st_size == 16_384
    assert not (cache / "glove.6B.zip").exists()
    fetch(server, cache)
    assert server.requests[-1][1] == "bytes=16384-"
    assert (cache / "glove.6B.zip").read_bytes() == ARCHIVE


def test_progress_reports_bytes_and_totals(server, cache):
    events = []

    class Recorder(download.NullProgress):
        def start(self, description, total, completed=0):
            events.append(("start", description, total, completed))

        def advance(self, amount):
            events.append(("advance", amount))

    fetch(server, cache, progress=Recorder())
    starts = [e for e in events if e[0] == "start"]
    assert starts[0] == ("start", "Downloading glove.6B.zip", len(ARCHIVE), 0)
    assert starts[1] == ("start", "Converting glove.6B.50d.txt", len(TEXT50), 0)
    advanced = [e[1] for e in events if e[0] == "advance"]
    assert sum(advanced) == len(ARCHIVE) + len(TEXT50)


def test_connection_refused_suggests_a_mirror_or_a_file(cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeFailure, match="cannot reach") as info:
        glove_cache.download_glove(
            "6B", 50, cache_dir=cache, url=f"http://127.0.0.1:{port}/glove.6B.zip"
        )
    assert "--url" in info.value.hint and "--from-file" in info.value.hint
    assert leftovers(cache) == []


def test_http_errors_are_reported(server, cache):
    with pytest.raises(RuntimeFailure, match="HTTP 404"):
        fetch(server, cache, name="missing.zip")


def test_an_unusable_cache_folder_is_reported(server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RuntimeFailure, match="cannot create the cache folder") as info:
        fetch(server, blocker / "cache")
    assert "--cache-dir" in info.value.hint


def test_a_file_that_cannot_be_written_is_reported(server, cache):
    (cache / "glove.6B.zip.incomplete").mkdir(parents=True)  # open() for writing fails
    with pytest.raises(RuntimeFailure, match=r"cannot write .*glove\.6B\.zip\.incomplete") as info:
        fetch(server, cache)
    assert "--cache-dir" in info.value.hint


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_reported(server, cache):
    cache.mkdir()
    (cache / "glove.6B.zip.incomplete").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(RuntimeFailure, match="no space left"):
        fetch(server, cache)
    (cache / "glove.6B.zip.incomplete").unlink()
    fetch(server, cache)
    (cache / "glove.6B.50d.npy").unlink()
    (cache / "glove.6B.50d.words.txt").unlink()
    (cache / "glove.6B.50d.npy.incomplete").symlink_to("/dev/full")
    with pytest.raises(RuntimeFailure, match="no space left"):
        fetch(server, cache)
    assert (
        not (cache / "glove.6B.50d.npy").exists()
        and not (cache / "glove.6B.50d.words.txt").exists()
    )
    assert leftovers(cache) == []


def test_from_file_takes_a_zip_or_the_text_and_never_downloads(tmp_path, cache):
    archive = tmp_path / "glove.6B.zip"
    archive.write_bytes(ARCHIVE)
    result = glove_cache.download_glove(
        "6B", 50, cache_dir=cache, from_file=archive, url="http://127.0.0.1:9/x"
    )
    assert not result.downloaded and result.converted and archive.exists()
    np.testing.assert_array_equal(np.load(result.vectors_path), expected_vectors(TEXT50))
    text = tmp_path / "glove.6B.100d.txt"
    text.write_bytes(TEXT100)
    result = glove_cache.download_glove("6B", 100, cache_dir=cache, from_file=text)
    np.testing.assert_array_equal(np.load(result.vectors_path), expected_vectors(TEXT100))
    truncated = tmp_path / "cut.zip"
    truncated.write_bytes(ARCHIVE[: len(ARCHIVE) // 2])
    with pytest.raises(InputError, match="not a valid zip"):
        glove_cache.download_glove("6B", 50, cache_dir=cache, from_file=truncated, force=True)
    assert truncated.exists()  # the user's file is never removed


def test_corpus_names_are_normalised():
    assert glove_cache.get_variant("42B").corpus == "42B.300d"
    assert glove_cache.get_variant("glove.840B.300d.zip").corpus == "840B.300d"
    assert glove_cache.get_variant("Twitter.27b").member(25) == "glove.twitter.27B.25d.txt"
    assert glove_cache.get_variant("42B").member(300) == "glove.42B.300d.txt"
    assert (
        glove_cache.get_variant("840B").url == "https://nlp.stanford.edu/data/glove.840B.300d.zip"
    )
    with pytest.raises(UsageError, match="Did you mean `6B`"):
        glove_cache.get_variant("6b.")


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("KDECLI_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert download.resolve_cache_dir(tmp_path / "given") == tmp_path / "given"
    assert download.resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("KDECLI_CACHE_DIR")
    assert download.resolve_cache_dir() == tmp_path / "xdg" / "kdecli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert download.resolve_cache_dir() == Path.home() / ".cache" / "kdecli"


# --- parsing --------------------------------------------------------------------------------


def parse(text: bytes, **kwargs):
    return text_format.parse_glove_text(io.BytesIO(text), source="t.txt", **kwargs)


def test_parsing_across_many_small_blocks_matches_the_oracle(monkeypatch):
    monkeypatch.setattr(text_format, "PARSE_CHUNK_BYTES", 997)  # lines straddle block edges
    vectors, words = parse(TEXT100)
    np.testing.assert_array_equal(vectors, expected_vectors(TEXT100))
    assert words == make_vectors(ROWS, 100, seed=1)[1]
    vectors, _ = parse(TEXT100, max_rows=123)
    assert vectors.shape == (123, 100)


def test_parsing_odd_lines():
    text = (
        b"3 2\r\n"  # a word2vec header, Windows line ends
        b"a b 1.5 -2\r\n"  # a word with a space, as in glove.840B
        b"\xc2\xa0 3 4 \r\n"  # a no-break space as the word, a trailing space
        b"c 5e-1 6"
    )  # no final newline
    vectors, words = parse(text)
    np.testing.assert_array_equal(vectors, np.array([[1.5, -2], [3, 4], [0.5, 6]], np.float32))
    assert words == ["a b", "\xa0", "c"]


def test_parsing_errors_name_the_line():
    with pytest.raises(
        InputError, match=r"t\.txt, line 2: expected a word and 3 numbers; found a word and 2"
    ):
        parse(b"a 1 2 3\nb 1 2\n")
    with pytest.raises(InputError, match="line 2: a value is not a finite number"):
        parse(b"a 1 2\nb nan 2\n")
    with pytest.raises(InputError, match="line 1: expected a word and 50 numbers"):
        parse(TEXT100, dim=50)


# --- the paper's protocol -------------------------------------------------------------------


def test_protocol_layout_and_cropping():
    batch, max_len, d = 3, 7, 5
    rows = np.arange(3 * batch * max_len * d, dtype=np.float32).reshape(-1, d)
    q, k, v = glove.glove_qkv(rows, n=4, batch=batch, max_len=max_len)
    assert q.shape == k.shape == v.shape == (batch, 1, 4, d) and q.dtype == torch.float32
    for b in range(batch):
        for i in range(4):
            assert torch.equal(q[b, 0, i], torch.from_numpy(rows[b * max_len + i]))
            assert torch.equal(
                v[b, 0, i], torch.from_numpy(rows[2 * batch * max_len + b * max_len + i])
            )
    assert torch.equal(k, q) and k.data_ptr() != q.data_ptr()
    full = glove.glove_qkv(rows, batch=batch, max_len=max_len)
    assert full[0].shape == (batch, 1, max_len, d)
    assert (
        glove.glove_qkv(rows.astype(np.float64), batch=batch, max_len=max_len)[2].dtype
        == torch.float64
    )


def test_protocol_too_short_names_both_counts():
    rows = np.zeros((3 * 2 * 10 - 1, 4), np.float32)
    with pytest.raises(InputError, match=r"needs 60 rows .*the input has 59"):
        glove.glove_qkv(rows, batch=2, max_len=10)
    with pytest.raises(UsageError, match=r"`n` must be an integer in \[1, 10\]; got 11"):
        glove.glove_qkv(np.zeros((60, 4), np.float32), n=11, batch=2, max_len=10)


def test_the_paper_defaults():
    rows = np.random.default_rng(0).standard_normal((3 * 8 * 16384, 3)).astype(np.float32)
    q, k, v = glove.glove_qkv(rows, n=1000)
    assert q.shape == (8, 1, 1000, 3)
    assert torch.equal(v[7, 0, 999], torch.from_numpy(rows[2 * 8 * 16384 + 7 * 16384 + 999]))


# --- INPUT glove:... ------------------------------------------------------------------------


def test_every_glove_form_loads_the_same_vectors(server, cache, tmp_path, monkeypatch):
    expected = expected_vectors(TEXT50)
    text = tmp_path / "glove.6B.50d.txt"
    text.write_bytes(TEXT50)
    both = tmp_path / "glove.6B.zip"
    both.write_bytes(ARCHIVE)
    single = tmp_path / "one.zip"
    single.write_bytes(make_zip({"glove.6B.50d.txt": TEXT50}))
    result = fetch(server, cache)
    for spec in (
        f"glove:{text}",
        f"glove:{both}#50",
        f"glove:{both}#50d",
        f"glove:{single}",
        f"glove:{result.vectors_path}",
        f"{text}",
    ):
        np.testing.assert_array_equal(
            glove.resolve_glove_source(spec, cache_dir=cache), expected, err_msg=spec
        )
    np.testing.assert_array_equal(
        glove.resolve_glove_source("glove:6B.50d", cache_dir=cache), expected
    )
    monkeypatch.setenv("KDECLI_CACHE_DIR", str(cache))
    np.testing.assert_array_equal(glove.resolve_glove_source("glove:glove.6B.50d"), expected)
    assert glove.resolve_glove_source(f"glove:{text}", max_rows=10).shape == (10, 50)


def test_glove_form_errors(tmp_path, cache):
    both = tmp_path / "glove.6B.zip"
    both.write_bytes(ARCHIVE)
    with pytest.raises(UsageError, match=r"2 text members.*#50.*#100"):
        glove.resolve_glove_source(f"glove:{both}", cache_dir=cache)
    with pytest.raises(InputError, match="no member for dim 300; the dims it holds: 50, 100"):
        glove.resolve_glove_source(f"glove:{both}#300", cache_dir=cache)
    with pytest.raises(UsageError, match="not in the cache folder") as info:
        glove.resolve_glove_source("glove:6B.50d", cache_dir=cache)
    assert info.value.hint == "Run `kdecli download-glove --corpus 6B --dim 50` first."
    with pytest.raises(UsageError, match="needs a dim"):
        glove.resolve_glove_source("glove:twitter.27B", cache_dir=cache)
    with pytest.raises(InputError, match="no such file"):
        glove.resolve_glove_source(f"glove:{tmp_path / 'glove.6B.50d.txt'}", cache_dir=cache)
    with pytest.raises(InputError, match="no such file"):
        glove.resolve_glove_source("glove:nonsense", cache_dir=cache)
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros(3, np.float32))
    with pytest.raises(InputError, match="2-D float array"):
        glove.resolve_glove_source(f"glove:{bad}")


def test_load_glove_input(tmp_path):
    rows = np.random.default_rng(1).standard_normal((3 * 2 * 40, 6)).astype(np.float32)
    path = tmp_path / "vectors.npy"
    np.save(path, rows)
    q, k, v, scale, source = glove.load_glove_input(f"glove:{path}", n=25, batch=2, max_len=40)
    assert q.shape == v.shape == (2, 1, 25, 6) and torch.equal(q, k)
    assert scale == pytest.approx(10**-0.5) and str(path) in source and "batch 2" in source
    q, _, v, _, _ = glove.load_glove_input(
        f"glove:{path}", n=80, batch=1, max_len=40
    )  # n > max_len: longer blocks
    assert q.shape == (1, 1, 80, 6) and torch.equal(v[0, 0], torch.from_numpy(rows[160:240]))
    with pytest.raises(InputError, match="needs 393,216 rows"):
        glove.load_glove_input(f"glove:{path}")


# --- the command ----------------------------------------------------------------------------


def invoke(args, **kwargs):
    from typer.testing import CliRunner

    from kdecli.cli import app  # registers every command

    return CliRunner().invoke(app, ["download-glove", *args], **kwargs)


def test_the_command_prints_the_cache_path_and_says_when_there_is_nothing_to_do(server, cache):
    args = [
        "--corpus",
        "6B",
        "--dim",
        "50",
        "--cache-dir",
        str(cache),
        "--url",
        server.url("glove.6B.zip"),
    ]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == str(cache / "glove.6B.50d.npy")
    assert "Converted 300 vectors of width 50" in first.stderr
    second = invoke(args)
    assert second.exit_code == 0 and second.stdout.strip() == str(cache / "glove.6B.50d.npy")
    assert "nothing to download" in second.stderr
    quiet = invoke(args + ["--quiet"])
    assert quiet.stderr == "" and quiet.stdout.strip() == str(cache / "glove.6B.50d.npy")


def test_the_command_maps_errors_and_interrupts_to_exit_codes(server, cache, monkeypatch):
    usage = invoke(["--corpus", "7B", "--cache-dir", str(cache)])
    assert (
        usage.exit_code == 2
        and "Error: unknown GloVe corpus `7B`" in usage.stderr
        and usage.stdout == ""
    )
    broken = invoke(
        [
            "--corpus",
            "6B",
            "--dim",
            "50",
            "--cache-dir",
            str(cache),
            "--url",
            server.url("nothing.zip"),
        ]
    )
    assert broken.exit_code == 1 and "HTTP 404" in broken.stderr

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(glove_cache, "download_glove", interrupted)
    stopped = invoke(["--corpus", "6B", "--dim", "50", "--cache-dir", str(cache)])
    assert stopped.exit_code == 130 and "run the same command again to resume" in stopped.stderr
