"""Link installed distributions from one site-packages folder into another (benchmarks/simulated_gpu_image.sh).

    python benchmarks/link_distributions.py SOURCE_SITE_PACKAGES TARGET_SITE_PACKAGES PATTERN...

Every distribution in SOURCE whose normalised name matches one of the PATTERNs (fnmatch, e.g. 'nvidia-*')
gets its top-level files and folders (from its RECORD, its .dist-info included) symlinked into TARGET, so
that TARGET's Python imports it and importlib.metadata lists it -- and nothing else of SOURCE. Used to give
the simulated GPU image the development venv's CUDA torch stack without downloading it again.
"""

from __future__ import annotations

import csv
import fnmatch
import importlib.metadata as md
import os
import re
import sys


def main(argv: list[str]) -> int:
    source, target, *patterns = argv
    linked = []
    for dist in md.distributions(path=[source]):
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        tops = set()
        for row in csv.reader((dist.read_text("RECORD") or "").splitlines()):
            first = row[0].split("/", 1)[0] if row else ""
            if first and first != ".." and not first.endswith(".pth"):
                tops.add(first)
        for top in sorted(tops):
            src, dst = os.path.join(source, top), os.path.join(target, top)
            if os.path.exists(src) and not os.path.lexists(dst):
                os.symlink(src, dst)
        linked.append(f"{name}=={dist.version}")
    if not linked:
        print(f"link_distributions: nothing in {source} matches {' '.join(patterns)}", file=sys.stderr)
        return 1
    print(f"linked {len(linked)} distributions: {' '.join(sorted(linked))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
