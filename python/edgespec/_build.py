"""What this installation of edgespec was built with."""
from __future__ import annotations

from typing import Any


def build_info() -> dict[str, Any]:
    """Describe the build: whether the CUDA extension is present and what it was compiled for.

    Never touches a GPU: it only reads constants the extension recorded at compile time.
    Keys: version, cuda (bool), architectures (list of str), dtypes, head_dims, cuda_version,
    and `reason` when the extension is absent.
    """
    from . import __version__

    info: dict[str, Any] = {"version": __version__, "cuda": False, "architectures": [],
                            "dtypes": [], "head_dims": [], "cuda_version": None}
    try:
        from . import _C  # noqa: PLC0415
    except ImportError as exc:
        info["reason"] = f"extension not built ({exc}); using the torch path"
        return info
    info.update(_C.build_info())
    return info
