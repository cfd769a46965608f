"""The wheel, installed alone in a fresh venv, runs the main job on the sample it ships.

Offline throughout: the wheel is built from a copy of the package with the build tools already
installed (``--no-build-isolation --no-index``) and installed with ``--no-deps --no-index``.  The
venv sees the current interpreter's dependencies (torch, numpy, …) through a .pth file that lists
their folders; lines of a .pth only add folders to ``sys.path``, so the checkout's editable install
of kdecli found there is not processed and cannot shadow the wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPENDENCIES = ("torch", "numpy", "typer", "rich", "h5py", "scipy")
MAIN_JOB = [
    "compare",
    "sample:glove",
    "--methods",
    "exact,mean,kdeformer,performer,reformer,scatterbrain",
    "--budgets",
    "64,128,256,512",
    "--seeds",
    "1",
    "--no-timing",
]


def run(cmd: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONNOUSERSITE": "1"}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def offline_build_problem() -> str | None:
    """Why ``pip wheel --no-build-isolation`` cannot build here, or None."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed (needed to build the wheel without network)"
    major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {version('setuptools')} needs the `wheel` package to build wheels"
    return None


def dependency_folders() -> list[str]:
    """The folders the dependencies are imported from (usually one site-packages)."""
    folders = []
    for name in DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"{name} is not installed"
        folder = str(Path(spec.origin).resolve().parents[1])  # .../site-packages/torch/__init__.py
        if folder not in folders:
            folders.append(folder)
    return folders


@pytest.mark.slow
def test_the_wheel_runs_the_main_job_on_its_own_sample(tmp_path):
    problem = offline_build_problem()
    if problem:
        pytest.skip(f"cannot build the wheel offline: {problem}")
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(
        ROOT / "kdecli", source / "kdecli", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            source,
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            tmp_path / "dist",
        ],
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("kdecli-*.whl")

    venv = tmp_path / "venv"
    outer_pip = tuple(int(p) for p in version("pip").split(".")[:2]) >= (22, 3)  # pip --python
    made = run(
        [sys.executable, "-m", "venv", *(["--without-pip"] if outer_pip else []), venv],
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    # Install before the .pth exists: pip then sees only the venv, never the checkout's kdecli.
    pip = [sys.executable, "-m", "pip", "--python", python] if outer_pip else [python, "-m", "pip"]
    installed = run([*pip, "install", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    purelib = run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path
    )
    (Path(purelib.stdout.strip()) / "kdecli_test_dependencies.pth").write_text(
        "\n".join(dependency_folders()) + "\n"
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([python, "-c", "import kdecli; print(kdecli.__file__)"], cwd=elsewhere)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.resolve()), where.stdout
    job = run([bin_dir / "kdecli", *MAIN_JOB], cwd=elsewhere)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "kdeformer" in job.stdout and "sample:glove" in job.stdout
