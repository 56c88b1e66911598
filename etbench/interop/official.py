"""Import the authors' released image ET weights (``bhoov/energy-transformer-jax``, a plain ``.npz``; SPEC §1.6).

The checkpoint stores ``Wk``/``Wq`` (H, Y, D), ``Xi`` (D, M) = ξᵀ, the patch encoder/decoder as ``x @ W + b``, a
scalar LayerNorm γ with bias δ, and the CLS/MASK tokens and positions. Their pipeline is reproduced exactly by
:class:`ImageET` with self-attention on, ReLU memories, E = E^ATT + E^HN and ``double_norm=True`` (their decoder
applies the energy LayerNorm a second time). Sizes D, H, Y, M are read from the array shapes; everything else is
validated against them, and every mismatch names the file, the key, the expected and the found shape.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from etbench.data.images import IMAGENET_MEAN, IMAGENET_STD
from etbench.errors import EtbenchError
from etbench.models.energy import GAMMA_MIN
from etbench.models.et_config import ETConfig
from etbench.models.image import ImageET, patchify, unpatchify

OFFICIAL_KEYS = ("Wk", "Wq", "Xi", "Wenc", "Benc", "Wdec", "Bdec", "LNORM_gamma", "LNORM_bias", "CLS_token",
                 "MASK_token", "POS_embed")


class OfficialCheckpointError(EtbenchError, ValueError):
    """The ``.npz`` is not a valid released image-ET checkpoint for the requested image geometry."""


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"official ET checkpoint not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise OfficialCheckpointError(f"{path}: holds a single array, expected an .npz archive of named arrays")
        with loaded as z:
            missing = [k for k in OFFICIAL_KEYS if k not in z.files]
            if missing:
                raise OfficialCheckpointError(
                    f"{path}: missing key(s) {', '.join(missing)}; expected keys {', '.join(OFFICIAL_KEYS)}, "
                    f"found {', '.join(sorted(z.files)) or 'none'}"
                )
            arrays = {k: z[k] for k in OFFICIAL_KEYS}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise OfficialCheckpointError(f"{path}: not a readable .npz archive ({e})") from e
    except ValueError as e:
        if isinstance(e, OfficialCheckpointError):
            raise
        raise OfficialCheckpointError(f"{path}: cannot read its arrays without unpickling (refused) ({e})") from e
    for k, a in arrays.items():
        if not np.issubdtype(a.dtype, np.floating):
            raise OfficialCheckpointError(f"{path}: key {k!r} must hold floating-point numbers, found dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise OfficialCheckpointError(f"{path}: key {k!r} holds non-finite values")
    return arrays


def _check_shape(path: Path, arrays: dict[str, np.ndarray], key: str, expected: tuple[int, ...], why: str) -> None:
    found = tuple(arrays[key].shape)
    if found != expected:
        raise OfficialCheckpointError(f"{path}: key {key!r} has shape {found}, expected {expected} ({why})")


def official_config(npz_path: str | Path, image_shape: tuple[int, int, int] = (3, 224, 224),
                    patch_size: int = 16) -> tuple[ETConfig, dict[str, np.ndarray]]:
    """Validated arrays of the checkpoint and the ET configuration they imply."""
    path = Path(npz_path)
    c, h, w = image_shape
    if patch_size <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"image_shape {image_shape} is not divisible by patch_size {patch_size}")
    a = _read_npz(path)
    if a["Wk"].ndim != 3:
        raise OfficialCheckpointError(f"{path}: key 'Wk' has shape {a['Wk'].shape}, expected 3 dims (H, Y, D)")
    heads, head_dim, dim = a["Wk"].shape
    if a["Xi"].ndim != 2:
        raise OfficialCheckpointError(f"{path}: key 'Xi' has shape {a['Xi'].shape}, expected 2 dims (D, M)")
    mems = a["Xi"].shape[1]
    pix = c * patch_size * patch_size
    tokens = (h // patch_size) * (w // patch_size) + 1
    geometry = f"image {image_shape}, patch {patch_size}"
    for key, shape, why in [
        ("Wq", (heads, head_dim, dim), "(H, Y, D) like Wk"),
        ("Xi", (dim, mems), "(D, M)"),
        ("Wenc", (pix, dim), f"(C·p·p, D) for {geometry}"),
        ("Benc", (dim,), "(D,)"),
        ("Wdec", (dim, pix), f"(D, C·p·p) for {geometry}"),
        ("Bdec", (pix,), f"(C·p·p,) for {geometry}"),
        ("LNORM_gamma", (), "a scalar"),
        ("LNORM_bias", (dim,), "(D,)"),
        ("CLS_token", (dim,), "(D,)"),
        ("MASK_token", (dim,), "(D,)"),
        ("POS_embed", (tokens, dim), f"(patches + 1, D) for {geometry}"),
    ]:
        _check_shape(path, a, key, shape, why)
    if not float(a["LNORM_gamma"]) >= GAMMA_MIN:
        raise OfficialCheckpointError(f"{path}: key 'LNORM_gamma' must be >= {GAMMA_MIN} (energy LayerNorm γ > 0), "
                                      f"found {float(a['LNORM_gamma'])}")
    cfg = ETConfig(dim=dim, heads=heads, head_dim=head_dim, memories=mems, steps=12, alpha=0.1, self_attention=True,
                   hn_kind="relu", terms="attn+hn")
    return cfg, a


def load_official_image_et(npz_path: str | Path, image_shape: tuple[int, int, int] = (3, 224, 224),
                           patch_size: int = 16) -> ImageET:
    """The authors' released image ET as an :class:`ImageET` (float32, eval mode, ``double_norm=True``)."""
    cfg, a = official_config(npz_path, image_shape, patch_size)
    model = ImageET(tuple(image_shape), patch_size, cfg, double_norm=True)

    def t(key: str, transpose: bool = False) -> torch.Tensor:
        arr = a[key].T if transpose else a[key]
        return torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # keeps 0-d γ 0-d

    with torch.no_grad():
        model.et.attn.wk.copy_(t("Wk"))
        model.et.attn.wq.copy_(t("Wq"))
        model.et.hn.xi.copy_(t("Xi", transpose=True))
        model.encoder.weight.copy_(t("Wenc", transpose=True))  # x @ Wenc + b  ==  Linear with weight Wencᵀ
        model.encoder.bias.copy_(t("Benc"))
        model.decoder.weight.copy_(t("Wdec", transpose=True))
        model.decoder.bias.copy_(t("Bdec"))
        model.et.norm.gamma.copy_(t("LNORM_gamma"))
        model.et.norm.delta.copy_(t("LNORM_bias"))
        model.cls_token.copy_(t("CLS_token"))
        model.mask_token.copy_(t("MASK_token"))
        model.pos_embed.copy_(t("POS_embed"))
    return model.eval()


def _load_png(path: Path, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """A picture as (C, H, W) in [0, 1]: grey/RGB by C, resized so it covers (H, W), then centre-cropped."""
    c, h, w = image_shape
    if c not in (1, 3):
        raise ValueError(f"inpaint_png handles 1- or 3-channel models, got image_shape {image_shape}")
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if c == 3 else "L")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    scale = max(h / im.height, w / im.width)
    size = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
    if size != im.size:
        im = im.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - w) // 2, (size[1] - h) // 2
    arr = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr[None] if c == 1 else arr.transpose(2, 0, 1).copy())


def inpaint_png(
    npz_path: str | Path,
    png_in: str | Path,
    png_out: str | Path,
    mask_ratio: float = 0.5,
    seed: int = 0,
    *,
    image_shape: tuple[int, int, int] = (3, 224, 224),
    patch_size: int = 16,
    steps: int = 12,
    alpha: float = 0.1,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> dict[str, Any]:
    """Mask ``mask_ratio`` of the patches of a picture at random (``seed``), inpaint them with the released ET and
    write ``masked | reconstruction | original`` side by side to ``png_out``.

    Returns the output path, the number of masked patches, the MSE on them (normalised pixel space) and the energy
    before each descent step.
    """
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1], got {mask_ratio}")
    if len(mean) != image_shape[0] or len(std) != image_shape[0]:
        raise ValueError(f"mean/std need {image_shape[0]} entries (one per channel), got {len(mean)}/{len(std)}")
    model = load_official_image_et(npz_path, image_shape, patch_size)
    pixels = _load_png(Path(png_in), image_shape)
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    images = ((pixels - m) / s).unsqueeze(0)
    n = model.num_patches
    k = max(1, round(mask_ratio * n))
    replace = torch.zeros(1, n, dtype=torch.bool)
    replace[0, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True
    recon, energies = model.inpaint(images, replace, steps=steps, alpha=alpha)
    err = (patchify(recon, patch_size) - patchify(images, patch_size)).pow(2).mean(-1)
    hidden = unpatchify(replace.unsqueeze(-1).float().expand(1, n, model.patch_dim), image_shape, patch_size)[0]
    masked = torch.where(hidden > 0, torch.full_like(pixels, 0.5), pixels)
    recon01 = (recon[0] * s + m).clamp(0, 1)
    gap = torch.ones(image_shape[0], image_shape[1], 2)
    panel = torch.cat([masked, gap, recon01, gap, pixels], -1)
    arr = (panel.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = Path(png_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if image_shape[0] == 1 else arr).save(out)
    return {
        "png_out": str(out),
        "masked_patches": k,
        "mse_masked": float(err[replace].mean()),
        "energies": [float(e) for e in energies[0]],
    }
