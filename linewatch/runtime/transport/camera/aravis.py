"""GenICam cameras (GigE Vision, USB3 Vision) through Aravis: NOT IMPLEMENTED YET.

`aravis:[DEVICE-ID]` is a reserved source URI. The source will use Aravis 0.8 through GObject
introspection (`gi.require_version("Aravis", "0.8")`), which pip cannot install: on Debian or
Ubuntu it is `apt-get install gir1.2-aravis-0.8 python3-gi` (and `aravis-tools` for
`arv-tool-0.8` and the fake camera `arv-fake-gv-camera-0.8`), with linewatch's venv created with
`--system-site-packages` so it sees the system's `gi`. The PyPI package `aravis-python` is a
Windows-only build of the same bindings, not a way to get them on Linux.

Until it exists, a GenICam camera whose vendor ships a V4L2/UVC driver works as opencv:/dev/videoN,
one with an RTSP output as rtsp://..., and any camera software that writes image files as a hot
folder (folder:///path).
"""

from __future__ import annotations

from linewatch.runtime.transport.camera.base import SourceError

INSTALL = ("Debian/Ubuntu: apt-get install gir1.2-aravis-0.8 python3-gi (and a venv made with "
           "--system-site-packages); pip's aravis-python is a Windows-only build")


class AravisNotImplemented(SourceError):
    """`aravis:` was asked for; the Aravis source is not implemented in this version."""


def aravis_bindings_problem() -> str | None:
    """Why Aravis 0.8's Python bindings cannot be imported here, or None when they can."""
    try:
        import gi

        gi.require_version("Aravis", "0.8")
        from gi.repository import Aravis  # noqa: F401
    except (ImportError, ValueError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def aravis_source(uri: str):
    """Raise AravisNotImplemented, saying what the source will need and what works meanwhile."""
    problem = aravis_bindings_problem()
    needs = (f"this Python cannot import Aravis 0.8's GObject bindings ({problem}); {INSTALL}" if problem
             else "Aravis 0.8's bindings are importable here")
    raise AravisNotImplemented(
        f"{uri}: the Aravis (GenICam) source is not implemented yet in linewatch camera; {needs}. Meanwhile use "
        "opencv:/dev/videoN (a camera with a V4L2/UVC driver), rtsp://... or folder:///path")
