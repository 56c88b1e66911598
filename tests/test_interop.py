"""The authors' checkpoint importer against an independent re-implementation of their pipeline (SPEC §1.6)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from etbench.interop import OfficialCheckpointError, inpaint_png, load_official_image_et

SHAPE, PATCH = (3, 32, 32), 16  # N = 4 patches, P = 768
D, H, Y, M = 16, 2, 8, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c, h, w = SHAPE
    p, n = c * PATCH * PATCH, (h // PATCH) * (w // PATCH)

    def r(*shape: int, s: float) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    return {
        "Wk": r(H, Y, D, s=0.4), "Wq": r(H, Y, D, s=0.4), "Xi": r(D, M, s=0.1),
        "Wenc": r(p, D, s=0.05), "Benc": r(D, s=0.1), "Wdec": r(D, p, s=0.2), "Bdec": r(p, s=0.1),
        "LNORM_gamma": np.array(1.3, dtype=np.float32), "LNORM_bias": r(D, s=0.1),
        "CLS_token": r(D, s=0.5), "MASK_token": r(D, s=0.5), "POS_embed": r(n + 1, D, s=0.5),
    }


@pytest.fixture
def npz(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = make_arrays()
    path = tmp_path / "et_official.npz"
    np.savez(path, **arrays)
    return path, arrays


def reference_inpaint(a: dict[str, np.ndarray], images: torch.Tensor, replace: torch.Tensor, steps: int,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' pipeline written out from SPEC §1.6 in float64, loops and autograd; no etbench code."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in a.items()}
    x_img = images.double()
    b, c, hh, ww = x_img.shape
    rows, cols = hh // PATCH, ww // PATCH
    patches = torch.stack([x_img[:, :, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH].reshape(b, -1)
                           for i in range(rows) for j in range(cols)], 1)  # row-major, each (c, h, w)
    x = patches @ t["Wenc"] + t["Benc"]
    for bi in range(b):
        for ni in range(x.shape[1]):
            if replace[bi, ni]:
                x[bi, ni] = t["MASK_token"]
    x = torch.cat([t["CLS_token"].expand(b, 1, -1), x], 1) + t["POS_embed"]

    def ln(z: torch.Tensor) -> torch.Tensor:
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return t["LNORM_gamma"] * (z - mu) / torch.sqrt(var + 1e-5) + t["LNORM_bias"]

    def energy(g: torch.Tensor) -> torch.Tensor:  # per sample
        beta = 1.0 / math.sqrt(t["Wk"].shape[1])
        k = torch.einsum("hyd,bnd->bhny", t["Wk"], g)
        q = torch.einsum("hyd,bnd->bhny", t["Wq"], g)
        scores = beta * torch.einsum("bhcy,bhky->bhck", q, k)  # all keys, diagonal included
        e_att = -(1.0 / beta) * torch.logsumexp(scores, -1).sum((1, 2))
        e_hn = -0.5 * (torch.relu(g @ t["Xi"]) ** 2).sum((1, 2))
        return e_att + e_hn

    energies = []
    for _ in range(steps):
        g = ln(x).detach().requires_grad_(True)
        e = energy(g)
        (grad,) = torch.autograd.grad(e.sum(), g)
        energies.append(e.detach())
        x = x - alpha * grad
    out = ln(ln(x[:, 1:])) @ t["Wdec"] + t["Bdec"]
    recon = torch.zeros(b, c, hh, ww, dtype=torch.float64)
    for idx in range(rows * cols):
        i, j = divmod(idx, cols)
        recon[:, :, i * PATCH:(i + 1) * PATCH, j * PATCH:(j + 1) * PATCH] = out[:, idx].reshape(b, c, PATCH, PATCH)
    return recon, torch.stack(energies, 1)


def test_load_infers_sizes_and_flags(npz: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, a = npz
    model = load_official_image_et(path, SHAPE, PATCH)
    cfg = model.et.cfg
    assert (cfg.dim, cfg.heads, cfg.head_dim, cfg.num_memories) == (D, H, Y, M)
    assert cfg.self_attention and cfg.hn_kind == "relu" and cfg.terms == "attn+hn" and model.double_norm
    assert model.et.norm.gamma.item() == pytest.approx(1.3)
    assert torch.equal(model.et.hn.xi, torch.from_numpy(a["Xi"].T))
    assert torch.equal(model.encoder.weight, torch.from_numpy(a["Wenc"].T))


def test_inpaint_matches_reference(npz: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, a = npz
    model = load_official_image_et(path, SHAPE, PATCH)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, *SHAPE, generator=gen)
    replace = torch.tensor([[True, False, True, False], [False, False, False, True], [True, True, True, True]])
    recon, energies = model.inpaint(images, replace, steps=12, alpha=0.1)
    ref_recon, ref_e = reference_inpaint(a, images, replace, 12, 0.1)
    assert recon.shape == (3, *SHAPE) and energies.shape == (3, 12)
    torch.testing.assert_close(recon.double(), ref_recon, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(energies.double(), ref_e, atol=1e-5, rtol=1e-5)
    assert (ref_e[:, -1] < ref_e[:, 0] - 1.0).all()  # the descent does real work here
    assert (energies[:, 1:] <= energies[:, :-1] + 1e-5 * energies[:, :-1].abs()).all()
    # the model's plain forward is the same 12-step, α = 0.1 pipeline
    torch.testing.assert_close(model.reconstruct(images, replace).double(), ref_recon, atol=1e-5, rtol=1e-5)


def _write(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "bad.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_corrupted_checkpoints_raise(tmp_path: Path) -> None:
    a = make_arrays()
    with pytest.raises(FileNotFoundError, match=r"nope\.npz"):
        load_official_image_et(tmp_path / "nope.npz", SHAPE, PATCH)
    missing = _write(tmp_path, {k: v for k, v in a.items() if k != "MASK_token"})
    with pytest.raises(OfficialCheckpointError, match=r"bad\.npz.*missing key\(s\) MASK_token"):
        load_official_image_et(missing, SHAPE, PATCH)
    wrong = _write(tmp_path, {**a, "Wq": a["Wq"][:, :4]})
    with pytest.raises(OfficialCheckpointError, match=r"'Wq' has shape \(2, 4, 16\), expected \(2, 8, 16\)"):
        load_official_image_et(wrong, SHAPE, PATCH)
    good = _write(tmp_path, a, "good.npz")
    wenc = r"good\.npz: key 'Wenc' has shape \(768, 16\), expected \(256, 16\)"
    with pytest.raises(OfficialCheckpointError, match=wenc):
        load_official_image_et(good, (1, 32, 32), PATCH)  # P != C·p·p
    with pytest.raises(OfficialCheckpointError, match=r"'POS_embed' has shape \(5, 16\), expected \(10, 16\)"):
        load_official_image_et(good, (3, 48, 48), PATCH)  # N + 1 != patches + 1
    with pytest.raises(OfficialCheckpointError, match="LNORM_gamma"):
        load_official_image_et(_write(tmp_path, {**a, "LNORM_gamma": np.array(-1.0, np.float32)}), SHAPE, PATCH)
    with pytest.raises(OfficialCheckpointError, match="'Benc' must hold floating-point"):
        load_official_image_et(_write(tmp_path, {**a, "Benc": np.arange(D)}), SHAPE, PATCH)
    pickled = _write(tmp_path, {**a, "CLS_token": np.array([object()] * D, dtype=object)})
    with pytest.raises(OfficialCheckpointError, match="unpickling"):
        load_official_image_et(pickled, SHAPE, PATCH)
    np.save(tmp_path / "single.npy", a["Wk"])
    with pytest.raises(OfficialCheckpointError, match="single array"):
        load_official_image_et(tmp_path / "single.npy", SHAPE, PATCH)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(OfficialCheckpointError, match=r"garbage\.npz"):
        load_official_image_et(garbage, SHAPE, PATCH)


def test_inpaint_png_side_by_side(npz: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, a = npz
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    res = inpaint_png(path, tmp_path / "in.png", tmp_path / "out" / "side.png", mask_ratio=0.5, seed=0,
                      image_shape=SHAPE, patch_size=PATCH)
    out = np.asarray(Image.open(res["png_out"]))
    assert out.shape == (32, 32 * 3 + 4, 3) and res["masked_patches"] == 2 and len(res["energies"]) == 12
    masked, recon, orig = out[:, :32], out[:, 34:66], out[:, 68:]
    assert np.array_equal(orig, pixels)  # already 32×32: no resampling
    # oracle: normalise, mask the same patches, run the reference pipeline
    x01 = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255.0)
    m, s = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    images = ((x01 - m) / s).unsqueeze(0)
    replace = torch.zeros(1, 4, dtype=torch.bool)
    replace[0, torch.randperm(4, generator=torch.Generator().manual_seed(0))[:2]] = True
    ref, ref_e = reference_inpaint(a, images, replace, 12, 0.1)
    ref01 = (ref[0] * s.double() + m.double()).clamp(0, 1).permute(1, 2, 0).numpy() * 255
    assert np.abs(recon.astype(float) - ref01).max() <= 1.0
    np.testing.assert_allclose(res["energies"], ref_e[0].numpy(), rtol=1e-5, atol=1e-5)
    for idx in range(4):
        i, j = divmod(idx, 2)
        tile = (slice(16 * i, 16 * i + 16), slice(16 * j, 16 * j + 16))
        if replace[0, idx]:
            assert (masked[tile] == 128).all()
        else:
            assert np.array_equal(masked[tile], pixels[tile])
    err = [((ref[0, :, t[0], t[1]] - images[0, :, t[0], t[1]].double()) ** 2).mean()
           for idx in range(4) if replace[0, idx]
           for t in [(slice(16 * (idx // 2), 16 * (idx // 2) + 16), slice(16 * (idx % 2), 16 * (idx % 2) + 16))]]
    assert res["mse_masked"] == pytest.approx(float(sum(err) / 2), rel=1e-4)


def test_inpaint_png_resizes_and_rejects_bad_input(npz: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    path, _ = npz
    Image.fromarray(np.zeros((40, 64, 3), dtype=np.uint8) + 90).save(tmp_path / "wide.png")
    res = inpaint_png(path, tmp_path / "wide.png", tmp_path / "o.png", image_shape=SHAPE, patch_size=PATCH)
    out = np.asarray(Image.open(res["png_out"]))
    assert out.shape == (32, 100, 3) and (out[:, 68:] == 90).all()
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"junk\.png"):
        inpaint_png(path, tmp_path / "junk.png", tmp_path / "o2.png", image_shape=SHAPE, patch_size=PATCH)
    with pytest.raises(ValueError, match="mask_ratio"):
        inpaint_png(path, tmp_path / "wide.png", tmp_path / "o3.png", mask_ratio=0.0, image_shape=SHAPE,
                    patch_size=PATCH)
