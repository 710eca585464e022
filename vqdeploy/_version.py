"""The installed version of vqdeploy (metadata of the installed distribution)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vqdeploy")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"
