"""`linewatch camera`: one capture process per camera, publishing linewatch.wire frames to the
daemon's ingest (an XPUB that connects, CurveZMQ when configured; the daemon binds).

    sources.py  the source URIs (opencv:, rtsp://, http://, file://, folder://, aravis:) and OpenCV
    folder.py   the hot folder: new image files, each sent once
    aravis.py   GenICam (GigE Vision, USB3 Vision) through Aravis 0.8
    bridge.py   the capture loop: reconnects with backoff, metrics, the daemon and file sinks

One process per camera, so a camera SDK that crashes takes one bridge down, not the daemon.
docs/line.md ("Cameras") is the user's guide.
"""

from linewatch.runtime.transport.camera.bridge import Backoff, CameraBridge, CameraMetrics, DaemonSink, FileSink
from linewatch.runtime.transport.camera.base import Captured, Source, SourceError, SourceLost
from linewatch.runtime.transport.camera.sources import open_source

__all__ = ["Backoff", "CameraBridge", "CameraMetrics", "Captured", "DaemonSink", "FileSink", "Source", "SourceError",
           "SourceLost", "open_source"]
