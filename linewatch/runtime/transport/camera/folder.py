"""The hot-folder source (`folder:///path`): new image files, each sent once.

What counts as a new file: a regular file directly in the folder, with an image suffix
(linewatch.images.IMAGE_SUFFIXES), whose name does not start with "." -- so a writer that can
should write `.name.png` (or `name.png.tmp`) and rename it when done: a rename is atomic and the
file is never seen half-written. For writers that cannot, a file is read only when it is
complete by two tests together:
  - its size and mtime are the same in `settle_polls` looks in a row (poll_interval_s apart), and
  - its end is there: a PNG ends with its IEND chunk, a JPEG with the EOI marker (FF D9), a BMP
    or WebP is as long as its header says (TIFF has no such end: size and mtime only);
and the image then decodes. A writer pausing longer than the polls is thus still not read half
way for PNG, JPEG, BMP and WebP. A file that stays unreadable for `unreadable_after_s` is set aside
(failed/ with after: move), counted and logged, never sent.

Oldest first (mtime, then name). After a file was handed on it is moved to done/ (after: move;
a name already there gets the frame id added) or left (after: leave).

Each file is sent once, also across restarts: before a file is handed on, a line goes into the
journal (`state_file`, in the folder): frame id, size, mtime (ns) and name. A file whose (name,
size, mtime) is in the journal is never sent again: after: leave skips it; after: move moves it
(a bridge stopped between the journal line and the move). At most once: a bridge killed between
the journal line and the send loses that one frame (it is still in the folder or done/).
Frame ids go on from the journal's last one (from 0 without a journal). The journal is rewritten
at each open and every COMPACT_EVERY lines, keeping only the files still in the folder.

Part id: `part_id_regex` searched in the file's stem (the group named `part`, else group 1, else
the whole match). Capture time: when the file is read (`capture_ts: read`), or its mtime.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from linewatch.config import FolderSourceConfig
from linewatch.images import IMAGE_SUFFIXES
from linewatch.runtime.transport.camera.base import Captured, Source, SourceLost, grey_or_colour

COMPACT_EVERY = 1000  # journal lines between two rewrites
_PNG_END = b"IEND\xaeB`\x82"

Key = tuple[str, int, int]  # name, size, mtime_ns


def looks_complete(data: bytes, suffix: str) -> bool:
    """Whether an image file's bytes end where its format says (PNG IEND, JPEG EOI, BMP/WebP
    length); True for formats without such a mark (TIFF)."""
    suffix = suffix.lower()
    if suffix == ".png":
        return data.endswith(_PNG_END)
    if suffix in (".jpg", ".jpeg"):
        return data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if suffix == ".bmp":
        if len(data) < 6:
            return False
        declared = int.from_bytes(data[2:6], "little")
        return declared in (0, len(data))  # 0: a writer that leaves the field empty
    if suffix == ".webp":
        return len(data) >= 12 and int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return True


def decode_image(data: bytes) -> tuple[np.ndarray, str] | None:
    """(uint8 or uint16 image, "bgr" | "gray") from a file's bytes, or None if they are no readable image."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    try:
        return grey_or_colour(image)
    except ValueError:
        return None


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_polls: int  # looks in a row with this size and mtime
    stable_since: float  # monotonic time the size and mtime were first seen


class FolderSource(Source):
    """New image files of a folder, each sent once (see the module's docstring)."""

    def __init__(self, uri: str, path: Path, config: FolderSourceConfig, log: Any = None,
                 readonly: bool = False) -> None:
        super().__init__()
        self.uri = uri
        self.live = True
        self.can_wait = True  # a file waits in the folder: nothing is skipped or dropped on send
        self.path = path
        self.config = config
        self.readonly = readonly
        self.unreadable_files = 0
        self._log = log
        self._regex = re.compile(config.part_id_regex) if config.part_id_regex else None
        self._journal_path = path / config.state_file
        self._sent: set[Key] = set()  # journalled files (sent or set aside) still to be recognised
        self._next_id = 0
        self._journal_lines = 0
        self._seen: dict[str, _Seen] = {}
        self._opened = False

    # ------------------------------------------------------------------ journal

    def _load_journal(self) -> None:
        self._sent.clear()
        next_id = 0
        try:
            text = self._journal_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        except OSError as e:
            raise SourceLost(f"cannot read the journal {self._journal_path}: {e}") from None
        for line in text.splitlines():  # a torn last line (killed mid-write) does not parse: ignored
            fields = line.split("\t", 3)
            try:
                if fields[0] == "#next" and len(fields) == 2:
                    next_id = max(next_id, int(fields[1]))
                    continue
                if fields[0] == "u" and len(fields) == 4:  # given back: not sent after all
                    self._sent.discard((fields[3], int(fields[1]), int(fields[2])))
                    continue
                if len(fields) != 4:
                    continue
                frame_id, size, mtime_ns, name = fields
                key = (name, int(size), int(mtime_ns))
                if frame_id != "-":
                    next_id = max(next_id, int(frame_id) + 1)
            except ValueError:
                continue
            self._sent.add(key)
        self._next_id = next_id

    def _compact(self) -> None:
        """Rewrite the journal with the next frame id and the journalled files still here."""
        kept = set()
        for key in self._sent:
            try:
                st = (self.path / key[0]).stat()
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == key[1:]:
                kept.add(key)
        self._sent = kept
        if self.readonly:
            return
        lines = [f"#next\t{self._next_id}"] + [f"-\t{size}\t{mtime}\t{name}" for name, size, mtime in sorted(kept)]
        tmp = self._journal_path.with_name(self._journal_path.name + ".tmp")
        try:
            tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
            os.replace(tmp, self._journal_path)
        except OSError as e:
            raise SourceLost(f"cannot write the journal {self._journal_path}: {e}") from None
        self._journal_lines = 0

    def _journal(self, frame_id: int | None, key: Key) -> None:
        self._sent.add(key)
        if self.readonly:
            return
        name, size, mtime_ns = key
        try:
            with open(self._journal_path, "a", encoding="utf-8") as f:
                f.write(f"{'-' if frame_id is None else frame_id}\t{size}\t{mtime_ns}\t{name}\n")
        except OSError as e:
            raise SourceLost(f"cannot write the journal {self._journal_path}: {e}") from None
        self._journal_lines += 1
        if self._journal_lines >= COMPACT_EVERY:
            self._compact()

    # ------------------------------------------------------------------ source

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceLost(f"no folder {self.path}")
        if not self.readonly and self.config.after == "move":
            for name in (self.config.done_dir, self.config.failed_dir):
                try:
                    (self.path / name).mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise SourceLost(f"cannot create {self.path / name}: {e}") from None
        self._load_journal()
        self._compact()
        self._seen.clear()
        self._opened = True

    def close(self) -> None:
        self._opened = False

    def _listing(self) -> list[tuple[str, int, int]]:
        """(name, size, mtime_ns) of the candidate files, oldest first."""
        found = []
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(".") or "\n" in name or os.path.splitext(name)[1].lower() not in IMAGE_SUFFIXES:
                        continue
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # gone since the listing
                    found.append((name, st.st_size, st.st_mtime_ns))
        except OSError as e:  # the folder was removed, unmounted, made unreadable
            raise SourceLost(f"cannot list {self.path}: {e.strerror or e}") from None
        found.sort(key=lambda f: (f[2], f[0]))
        return found

    def read(self, stop: threading.Event) -> Captured | None:
        if not self._opened:
            raise SourceLost("not open")
        self.polls += 1
        now = time.monotonic()
        listing = self._listing()
        present = {name for name, _, _ in listing}
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        for name, size, mtime_ns in listing:
            key = (name, size, mtime_ns)
            if key in self._sent:  # journalled: sent (or set aside) before
                if self.config.after == "move" and not self.readonly:
                    self._move(name, self.config.done_dir, None)
                    self._sent.discard(key)
                continue
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
                self._seen[name] = _Seen(size, mtime_ns, 1, now)
                continue
            seen.stable_polls += 1
            if seen.stable_polls < self.config.settle_polls:
                continue
            captured = self._take(name, key, seen, now)
            if captured is not None:
                return captured
        stop.wait(self.config.poll_interval_s)
        return None

    def _take(self, name: str, key: Key, seen: _Seen, now: float) -> Captured | None:
        """The file as a frame, or None while it is not complete (set aside once that lasts)."""
        path = self.path / name
        try:
            data = path.read_bytes()
        except OSError:
            return None  # gone or not readable (yet)
        decoded = decode_image(data) if len(data) == key[1] and looks_complete(data, path.suffix) else None
        if decoded is None:
            if now - seen.stable_since >= self.config.unreadable_after_s:
                self._set_aside(name, key, f"not a complete, readable image after {self.config.unreadable_after_s:g} s "
                                f"({len(data)} bytes)")
            return None
        del self._seen[name]
        image, pixel_format = decoded
        frame_id = self._next_id
        self._journal(frame_id, key)  # before it is handed on: never twice, even across a restart
        self._next_id += 1
        capture_ts = time.time() if self.config.capture_ts == "read" else key[2] / 1e9
        return Captured(image, pixel_format, frame_id, capture_ts, self._part_id(path.stem),
                        done=lambda: self._finish(name, key, frame_id), undo=lambda: self._give_back(key))

    def _part_id(self, stem: str) -> str | None:
        if self._regex is None:
            return None
        match = self._regex.search(stem)
        if match is None:
            return None
        if "part" in self._regex.groupindex:
            return match.group("part")
        return match.group(1) if self._regex.groups else match.group(0)

    def _finish(self, name: str, key: Key, frame_id: int) -> None:
        if self.config.after == "move" and not self.readonly:
            if self._move(name, self.config.done_dir, frame_id):
                self._sent.discard(key)

    def _give_back(self, key: Key) -> None:
        """The file was not sent after all (stopped while waiting for the daemon): send it again."""
        self._sent.discard(key)
        if not self.readonly:
            name, size, mtime_ns = key
            try:
                with open(self._journal_path, "a", encoding="utf-8") as f:
                    f.write(f"u\t{size}\t{mtime_ns}\t{name}\n")
            except OSError as e:
                if self._log is not None:
                    self._log.warning("camera_journal_not_written", file=str(self._journal_path), error=str(e))

    def _set_aside(self, name: str, key: Key, why: str) -> None:
        self.unreadable_files += 1
        self._seen.pop(name, None)
        if self._log is not None:
            self._log.warning("camera_file_unreadable", file=str(self.path / name), reason=why,
                              action=f"moved to {self.config.failed_dir}/" if self.config.after == "move" else "skipped")
        self._journal(None, key)
        if self.config.after == "move" and not self.readonly:
            if self._move(name, self.config.failed_dir, None):
                self._sent.discard(key)

    def _move(self, name: str, folder: str, frame_id: int | None) -> bool:
        source = self.path / name
        target = self.path / folder / name
        if target.exists():
            stem, suffix = os.path.splitext(name)
            target = target.with_name(f"{stem}.{frame_id if frame_id is not None else time.time_ns()}{suffix}")
        try:
            os.replace(source, target)
        except OSError as e:
            if self._log is not None:
                self._log.warning("camera_file_not_moved", file=str(source), to=str(target), error=str(e))
            return False
        return True
