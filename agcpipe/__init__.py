"""agcpipe: attributed graph clustering as an orchestrated, cached, tracked pipeline."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("agcpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
