"""The self-check's reference frames (`runtime.selfcheck`): the known-good and known-bad parts
a round puts through the live pipeline (linewatch.runtime.selfcheck).

  good   the files in `selfcheck.good`; when that is empty, `good_count` of the bank's own good
         images, spread evenly over the files it was built from (its manifest names the folder
         and the files; they must still be there)
  bad    the files in `selfcheck.bad`, then `bad_count` made from the good references by the
         synthetic defect code (linewatch.sim.defects: contamination, scratch, in turn),
         reference i painted on good reference i mod the number of good ones with
         np.random.default_rng([seed, i]): the same frames at every start

Every reference must have the size of the frames the bank judges. Errors name the file and
what to change (ValueError; serve refuses to start on one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from linewatch.config import SelfCheckConfig
from linewatch.images import ImageError, read_image
from linewatch.runtime.selfcheck import Reference
from linewatch.sim.defects import DEFECT_KINDS, paint_defect


def spread(n: int, count: int) -> list[int]:
    """`count` indices out of range(n), evenly spread, first and last included (all of them
    when count >= n)."""
    if count >= n:
        return list(range(n))
    if count == 1:
        return [0]
    return sorted({int(round(i * (n - 1) / (count - 1))) for i in range(count)})


def bank_good_files(manifest: Any, count: int) -> list[Path]:
    """`count` of the good image files a bank was built from (its manifest's source folder
    and file names), evenly spread; ValueError when they are not there."""
    folder = Path(manifest.source)
    names = list(manifest.source_files)
    chosen = [folder / names[i] for i in spread(len(names), count)]
    missing = [str(p) for p in chosen if not p.is_file()]
    if missing:
        raise ValueError(f"selfcheck: the bank's good images are not where it was built from ({', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}); name known-good image files in selfcheck.good")
    return chosen


def _read(path: str | Path) -> np.ndarray:
    try:
        return read_image(path)
    except ImageError as e:
        raise ValueError(f"selfcheck: {e}") from None


def load_references(config: SelfCheckConfig, processor: Any) -> list[Reference]:
    """The references for `processor` (an Inspector: its bank's manifest and frame size)."""
    good_paths = [Path(p) for p in config.good] or (
        bank_good_files(processor.bank.manifest, config.good_count) if config.good_count else [])
    good = [Reference(f"good/{p.name}", "pass", _read(p)) for p in good_paths]
    bad = [Reference(f"bad/{p.name}", "fail", _read(p)) for p in map(Path, config.bad)]
    for i in range(config.bad_count):
        base = good[i % len(good)]
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        image, _ = paint_defect(base.image, kind, np.random.default_rng([config.seed, i]))
        bad.append(Reference(f"bad/{kind}-{i}/{base.name.removeprefix('good/')}", "fail", image))
    size = processor.frame_size
    for r in good + bad:
        if size is not None and tuple(r.image.shape[:2]) != tuple(size[:2]):
            raise ValueError(f"selfcheck: reference {r.name} is {r.image.shape[1]}x{r.image.shape[0]}, the bank judges "
                             f"{size[1]}x{size[0]} frames")
    return good + bad
