"""felixscan: proves the Calico Felix metrics endpoint is disabled and unreachable on every node."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("felixscan")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+src"
