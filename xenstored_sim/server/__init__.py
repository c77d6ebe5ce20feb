"""The trio shell of the daemon: listeners, per-connection tasks, guest sockets."""

from .daemon import DaemonConfig, XenstoredServer, serve_xenstored

__all__ = ["DaemonConfig", "XenstoredServer", "serve_xenstored"]
