"""Fill a bare virtual environment with exactly the distributions a wheel's install resolves to.

    python .ci/link_env.py REPORT.json TARGET_SITE_PACKAGES

REPORT.json is ``pip install --dry-run --ignore-installed --report`` for the wheel with the lock.
Each of its distributions (agiqa aside) is taken from this interpreter's site-packages, where the
README's install put it with the same lock, and linked file by file (its RECORD) into the
target, so the environment holds those distributions and nothing else without a second
multi-GB copy. A distribution missing here, or at another version, stops CI.
"""

from __future__ import annotations

import json
import os
import re
import sys
import sysconfig
from importlib.metadata import distributions
from pathlib import Path


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    report, target = Path(sys.argv[1]), Path(sys.argv[2])
    source = Path(sysconfig.get_paths()["purelib"]).resolve()
    here = {_norm(d.metadata["Name"]): d for d in distributions(path=[str(source)])}
    wanted = {_norm(i["metadata"]["name"]): i["metadata"]["version"]
              for i in json.loads(report.read_text())["install"]}
    wanted.pop("agiqa", None)
    problems, files = [], 0
    for name, version in sorted(wanted.items()):
        dist = here.get(name)
        if dist is None or dist.version != version:
            problems.append(f"{name}=={version}: "
                            f"{'not installed' if dist is None else 'installed ' + dist.version}")
            continue
        for f in dist.files or ():
            real = Path(dist.locate_file(f)).resolve()
            if source not in real.parents or not real.is_file():  # scripts, data outside
                continue
            link = target / real.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                os.symlink(real, link)
                files += 1
    for line in problems:
        print(f"link_env: {line} (the README's install should have brought it)", file=sys.stderr)
    print(f"linked {len(wanted) - len(problems)} distributions ({files} files) into {target}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
