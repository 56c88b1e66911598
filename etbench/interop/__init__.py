"""Interoperability with the authors' released artefacts (SPEC §1.6)."""

from etbench.interop.official import OfficialCheckpointError, inpaint_png, load_official_image_et

__all__ = ["OfficialCheckpointError", "inpaint_png", "load_official_image_et"]
