"""The wheel ships every file of the package (``.ci/run`` installs it in a fresh venv)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_ships_every_file_of_the_package(tmp_path):
    # Built from a copy: a build writes build/ and *.egg-info next to the sources.
    shutil.copytree(REPO / "src", tmp_path / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp_path / "dist"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("agiqa-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = tmp_path / "src" / "agiqa"
    files = {p.relative_to(tmp_path / "src").as_posix() for p in package.rglob("*") if p.is_file()}
    assert {"agiqa/presets/prompts/paper.json", "agiqa/presets/mllms/llava-1.5-7b.json",
            "agiqa/presets/backbones/tiny.json"} <= files
    assert sorted(files - shipped) == []
