"""``etbench inpaint``: a picture through the authors' released ImageNet ET weights (``etbench.interop``)."""

from __future__ import annotations

import argparse


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("npz")
    p.add_argument("png")
    p.add_argument("out")
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--alpha", type=float, default=0.1)


def inpaint(a: argparse.Namespace) -> int:
    from etbench.interop.official import inpaint_png

    res = inpaint_png(a.npz, a.png, a.out, mask_ratio=a.mask_ratio, seed=a.seed,
                      image_shape=(3, a.image_size, a.image_size), patch_size=a.patch, steps=a.steps,
                      alpha=a.alpha)
    print(f"wrote {res['png_out']} (masked-patch MSE {res['mse_masked']:.4f})")
    return 0
