"""safron: seamless H&E histology images of any size from tissue component masks (the SAFRON method)."""

from __future__ import annotations

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation can do: compiled CUDA kernels and architectures, importable backends."""
    from . import _core
    from .backends import available_backends

    info = dict(_core.build_info())
    info["backends"] = available_backends()
    info["version"] = __version__
    return info


def render(mask_path, out_path, **options):
    """Render a mask file to a pyramidal BigTIFF; see `safron.engine.render`."""
    from .engine import render as _render

    return _render(mask_path, out_path, **options)


__all__ = ["__version__", "build_info", "render"]
