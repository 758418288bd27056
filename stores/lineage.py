"""What made an artifact: the versions of this library and of the dependencies that shape its bytes.

Teachers, stores, students and exports record ``dependency_versions()``, so a result can be traced to
the code that produced it (a timm or torch upgrade can change a network's numbers; zarr, numcodecs or
webdataset a store's files). Versions come from the installed distributions' metadata.

Example:
    >>> dependency_versions()["torch"]
    '2.14.1+cu130'
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["PACKAGES", "dependency_versions", "library_version"]

PACKAGES = ("vfm-reinforce", "torch", "timm", "open_clip_torch", "zarr", "numcodecs", "webdataset", "deepspeed",
            "polars", "safetensors")
UNKNOWN = "0+unknown"  # run from a checkout that was never installed


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return UNKNOWN


def library_version() -> str:
    return _version("vfm-reinforce")


def dependency_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """``{distribution: version}`` of ``PACKAGES`` and ``extra`` (a missing one: ``0+unknown``)."""
    return {package: _version(package) for package in (*PACKAGES, *extra)}
