"""What native libraries write to stderr, as structured log events.

libpng, libjpeg and OpenCV write their complaints about a corrupt frame (`libpng error: IHDR:
CRC error`, `Corrupt JPEG data: bad Huffman code`, `[ WARN:0@1.2] global ...`) straight to file
descriptor 2, beside the daemon's JSON log lines and without any rate limit (a fuzz run: 360
raw lines). NativeStderr, while the daemon runs, puts a pipe on descriptor 2 and reads it on a
thread of its own: each line becomes a `native_library_message` event (library: libpng,
libjpeg, opencv or unknown, guessed from the line; message: the line), at most one per library
per 10 s with the count held back since (`not_logged_since_last`), and every line is counted
in `linewatch_native_messages_total{library}`.

The log itself must not go into the pipe: Python's `sys.stderr` becomes a copy of the original
descriptor 2 (configure_logging writes to whatever sys.stderr is at each line). Safety:
- the reader thread handles each line inside try/except; if it ends anyway, it puts the
  original stderr back on descriptor 2 and closes the pipe, so native code never blocks on a
  full pipe (a write in progress gets EPIPE) and later lines reach stderr raw, as before;
- lines longer than MAX_LINE_BYTES are cut, bytes that are not UTF-8 become U+FFFD;
- stop() (and, should it be missed, exit) restores descriptor 2 and sys.stderr, then logs what
  was left in the pipe and the counts still held back.
One capture per process (a second start() while one runs does nothing). Child processes
started meanwhile (the archive's picture encoder) inherit the pipe as their stderr, so their
lines are captured too. Left: what native code writes in the instant before the process dies
(an abort's message) can still be in the pipe, unread, when it does.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import sys
import threading
import time
from typing import Any, Callable, TextIO

from linewatch.runtime.ops.logs import RateLimiter

EVENT = "native_library_message"
HELD_BACK_EVENT = "native_library_messages_held_back"
LOGGER = "linewatch.native"
LOG_INTERVAL_S = 10.0  # at most one event per library per 10 s, like the rest of the runtime
MAX_LINE_BYTES = 2048  # a longer line is cut here (its rest dropped)
READ_BYTES = 65536
POLL_MS = 500  # how often the reader looks whether stop() asked it to end (when no EOF comes)
LIBRARIES = ("libpng", "libjpeg", "opencv", "unknown")

_OPENCV = re.compile(r"^(\[\s*(WARN|ERROR|INFO|DEBUG|FATAL|VERBOSE)\b|OpenCV\(|OpenCV Error|cv::)")
# libjpeg(-turbo)'s messages (jerror.h) that do not say JPEG or JFIF themselves
_LIBJPEG_PREFIXES = ("Huffman table", "Quantization table", "Bogus ", "Unsupported marker", "Inconsistent progression",
                     "Invalid SOS", "Invalid component ID", "Invalid crop request", "Premature end of input file")

_active_lock = threading.Lock()
_active: NativeStderr | None = None  # the capture running in this process, if any


def guess_library(line: str) -> str:
    """Which library wrote `line`: "libpng", "libjpeg", "opencv" or "unknown" (by its prefix)."""
    text = line.lstrip()
    low = text.lower()
    if low.startswith("libpng"):
        return "libpng"
    if _OPENCV.match(text):
        return "opencv"
    if "jpeg" in low or "jfif" in low or text.startswith(_LIBJPEG_PREFIXES):
        return "libjpeg"
    return "unknown"


class LineSplitter:
    """Bytes in, lines out: split at newlines, each cut to `max_bytes` and decoded as UTF-8
    (errors="replace"), trailing whitespace and carriage returns dropped, empty lines skipped.
    A line with no newline yet waits for the next feed(), or for flush()."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._partial = bytearray()
        self._cut = False  # the partial line already passed max_bytes: the rest up to its newline is dropped

    def feed(self, data: bytes) -> list[str]:
        lines = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._add(data[start:])
                return lines
            self._add(data[start:end])
            lines += self._take()
            start = end + 1

    def flush(self) -> list[str]:
        """The last line, when it had no newline."""
        return self._take()

    def _add(self, chunk: bytes) -> None:
        room = self.max_bytes - len(self._partial)
        if len(chunk) > room:
            self._cut = True
            chunk = chunk[:max(room, 0)]
        self._partial += chunk

    def _take(self) -> list[str]:
        text = bytes(self._partial).decode("utf-8", errors="replace").rstrip()
        if self._cut and text:
            text += " [cut]"
        self._partial.clear()
        self._cut = False
        return [text] if text else []


class NativeStderr:
    """Captures file descriptor 2 while it runs (see the module's docstring).

    log: a structlog logger (events carry logger="linewatch.native"). metrics: a Metrics (its
    native_messages counter) or None. clock: monotonic seconds for the rate limit (tests pass a
    fake one). enabled=False: start() does nothing (runtime.logging.capture_native_stderr).
    """

    def __init__(self, log: Any, metrics: Any = None, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = LOG_INTERVAL_S, max_line_bytes: int = MAX_LINE_BYTES,
                 enabled: bool = True) -> None:
        self.log = log
        self.metrics = metrics
        self.clock = clock
        self.enabled = enabled
        self.limiter = RateLimiter(interval_s, max_keys=len(LIBRARIES))
        self._splitter = LineSplitter(max_line_bytes)
        self._lock = threading.Lock()
        self._saved_fd: int | None = None  # a copy of the original descriptor 2
        self._read_fd: int | None = None  # the pipe's read end (the reader thread's; it closes it)
        self._fd2_restored = True
        self._python_stderr: TextIO | None = None  # sys.stderr while capturing (on _saved_fd)
        self._replaced_stderr: TextIO | None = None  # the sys.stderr it stands in for
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lw-native-stderr", daemon=True)
        self.failure: str | None = None  # why the reader thread ended early, if it did
        self.lines = 0  # lines read (all of them, logged or held back)

    @property
    def capturing(self) -> bool:
        """Whether descriptor 2 goes to this capture now."""
        return not self._fd2_restored

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # ------------------------------------------------------------------ start / stop

    def start(self) -> bool:
        """Put the pipe on descriptor 2 and start the reader; returns whether it captures (not
        when disabled, when another capture runs, or when the descriptors cannot be set up:
        then stderr stays as it is, and a warning says why)."""
        global _active
        if not self.enabled:
            return False
        with _active_lock:
            if _active is not None or self._thread.ident is not None:
                return False
            saved = read = write = None
            try:
                _flush(sys.stderr)
                saved = os.dup(2)
                read, write = os.pipe()
                os.dup2(write, 2)  # descriptor 2 stays inheritable: child processes write here too
            except OSError as e:
                for fd in (saved, read):
                    if fd is not None:
                        os.close(fd)
                self.log.warning("native_stderr_not_captured", logger=LOGGER, error=repr(e))
                return False
            finally:
                if write is not None:
                    os.close(write)
            self._saved_fd, self._read_fd, self._fd2_restored = saved, read, False
            try:
                self._redirect_python_stderr(saved)
                self._thread.start()
            except Exception as e:  # noqa: BLE001 - no reader: descriptor 2 must not stay on the pipe
                self._undo_start()
                self.log.warning("native_stderr_not_captured", logger=LOGGER, error=repr(e))
                return False
            _active = self
        atexit.register(self.stop)
        return True

    def stop(self, timeout_s: float = 2.0) -> None:
        """Restore descriptor 2 and sys.stderr, log what is left in the pipe and the counts
        held back. Does nothing when it never started; safe to call twice."""
        global _active
        with self._lock:
            if self._saved_fd is None:
                return
            self._restore_fd2()  # the pipe's last write end closes: the reader reads the rest, then EOF
        self._stop.set()  # for a child process that still holds the pipe open: no EOF comes then
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        with self._lock:
            self._close_saved()
        with _active_lock:
            if _active is self:
                _active = None
        atexit.unregister(self.stop)
        for library, n in sorted(self.limiter.take_held_back().items()):
            self._log(HELD_BACK_EVENT, library=library, not_logged_since_last=n)

    def _undo_start(self) -> None:
        """A start that failed after the pipe went on descriptor 2: all back as it was."""
        with self._lock:
            self._restore_fd2()
            self._close_saved()
            if self._read_fd is not None:
                os.close(self._read_fd)
                self._read_fd = None

    def _close_saved(self) -> None:
        """(Under _lock, descriptor 2 restored.) sys.stderr back to what it was, the copy of the
        original descriptor 2 closed."""
        if self._python_stderr is not None and sys.stderr is self._python_stderr:
            sys.stderr = self._replaced_stderr
        if self._python_stderr is not None:
            try:
                self._python_stderr.close()  # closes _saved_fd (a late write gets ValueError, never another file)
            except OSError:
                pass
        elif self._saved_fd is not None:
            os.close(self._saved_fd)
        self._saved_fd = self._python_stderr = self._replaced_stderr = None

    def _redirect_python_stderr(self, saved: int) -> None:
        """Python's own stderr (tracebacks, warnings, the log) to the copy of the original
        descriptor 2, when it wrote to descriptor 2 (not when a test put something else there)."""
        try:
            if sys.stderr is None or sys.stderr.fileno() != 2:
                return
        except (AttributeError, OSError, ValueError):
            return
        self._replaced_stderr = sys.stderr
        self._python_stderr = open(saved, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                                   errors="backslashreplace", closefd=True)
        sys.stderr = self._python_stderr

    def _restore_fd2(self) -> None:
        """(Under _lock.) The original stderr back on descriptor 2."""
        if self._fd2_restored or self._saved_fd is None:
            return
        _flush(sys.stderr)
        os.dup2(self._saved_fd, 2)
        self._fd2_restored = True

    # ------------------------------------------------------------------ the reader

    def _run(self) -> None:
        read_fd = self._read_fd
        assert read_fd is not None
        try:
            poller = select.poll()
            poller.register(read_fd, select.POLLIN)
            while True:
                if not poller.poll(POLL_MS):
                    if self._stop.is_set():
                        break
                    continue
                data = os.read(read_fd, READ_BYTES)
                if not data:  # EOF: descriptor 2 restored and no child holds the pipe
                    break
                for line in self._splitter.feed(data):
                    self._handle_safely(line)
            for line in self._splitter.flush():
                self._handle_safely(line)
        except BaseException as e:  # noqa: BLE001 - never let native stderr block: fall back to raw stderr
            self.failure = repr(e)
        finally:
            with self._lock:
                self._restore_fd2()
            os.close(read_fd)  # a native write blocked on a full pipe gets EPIPE instead of waiting for ever
            if self.failure is not None:
                self._log("native_stderr_capture_failed", level="error", error=self.failure,
                          detail="native libraries' lines reach stderr raw from now on")

    def _handle_safely(self, line: str) -> None:
        try:
            self.handle_line(line)
        except Exception:  # noqa: BLE001 - one line that cannot be logged must not end the capture
            pass

    def handle_line(self, line: str) -> str:
        """Count the line, log it unless the rate limit holds it back; returns its library."""
        self.lines += 1
        library = guess_library(line)
        if self.metrics is not None:
            self.metrics.native_messages.labels(library=library).inc()
        held_back = self.limiter.allow(library, self.clock())
        if held_back is not None:
            self._log(EVENT, library=library, message=line, not_logged_since_last=held_back)
        return library

    def _log(self, event: str, level: str = "warning", **fields: Any) -> None:
        try:
            getattr(self.log, level)(event, logger=LOGGER, **fields)
        except Exception:  # noqa: BLE001 - e.g. stderr closed at exit
            pass


def _flush(stream: Any) -> None:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):
        pass
