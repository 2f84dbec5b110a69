"""Regenerate or check ``constraints.txt``, the complete lock of the install (stdlib only).

    python requirements/lock.py                  # resolve afresh, rewrite constraints.txt
    pip freeze | python requirements/lock.py --check requirements/constraints.txt
    python requirements/lock.py --check requirements/constraints.txt --report report.json

Regenerating resolves ``.[test]`` in a throwaway virtual environment with ``pip install
--dry-run --report``, keeping the versions already pinned (delete a line to let that package
move), and writes every package of the resolution. ``--check`` reads ``pip freeze`` output (or, with
``--report``, what ``pip install --dry-run --report`` would install) and fails when a package is
missing from the lock or at another version.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = """\
# The complete lock of `pip install -c requirements/constraints.txt ".[test]"`: every package
# of the install, transitive ones included, resolved for CPython 3.11 on Linux x86-64.
# Regenerate: see requirements/README.md.
"""
IGNORED = {"agiqa", "pip"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lines) -> dict[str, tuple[str, str]]:
    """``name==version`` lines → normalised name → (name as written, version)."""
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (s.strip() for s in line.split("==", 1))
            pins[_norm(name)] = (name, version)
    return pins


def check(lock_file: Path, freeze_lines) -> int:
    lock = read_pins(lock_file.read_text().splitlines())
    bad = []
    for key, (name, version) in sorted(read_pins(freeze_lines).items()):
        if key in IGNORED:
            continue
        if key not in lock:
            bad.append(f"{name}=={version} is installed but not pinned in {lock_file}")
        elif lock[key][1] != version:
            bad.append(f"{name}=={version} is installed, {lock_file} pins {lock[key][1]}")
    for line in bad:
        print(line, file=sys.stderr)
    print(f"lock check: {len(bad)} problem(s)", file=sys.stderr)
    return 1 if bad else 0


def regenerate(lock_file: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        report = Path(tmp) / "report.json"
        constraints = ["-c", str(lock_file)] if lock_file.is_file() else []
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--dry-run",
                        "--report", str(report), *constraints, ".[test]"],
                       check=True, cwd=HERE.parent)
        installed = json.loads(report.read_text())["install"]
    pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in installed
                  if _norm(i["metadata"]["name"]) not in IGNORED)
    lock_file.write_text(HEADER + "\n".join(sorted(pins, key=str.lower)) + "\n")
    print(f"{len(pins)} packages pinned in {lock_file}")


def report_lines(report: Path) -> list[str]:
    """``name==version`` of every package a ``pip install --dry-run --report`` would install."""
    return [f"{i['metadata']['name']}=={i['metadata']['version']}"
            for i in json.loads(report.read_text())["install"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, metavar="LOCK",
                        help="Check `pip freeze` output on standard input against LOCK.")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="With --check: check the packages of a `pip install --dry-run "
                             "--report JSON` instead of standard input.")
    args = parser.parse_args()
    if args.check:
        lines = report_lines(args.report) if args.report else sys.stdin.read().splitlines()
        return check(args.check, lines)
    regenerate(HERE / "constraints.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
