"""REG, representation entanglement (Wu et al. 2025, arXiv 2507.01467): one class token of the target encoder
(DINOv2's CLS) is entangled with the image's tokens. It is noised with the image's t, enters the SiT as a first
token (the model's `cls_projectors2` and `wg_norm`, models.SiT), is denoised with the image tokens through
every block and leaves through `final_layer.linear_cls` as its velocity. For the class token c (N, D_c) and
its own ε_c:

    c_t = (1 − t)·c + t·ε_c,   L_reg = mean_{n, d} ( v_θ^cls(x_t, c_t, t, y)[n, d] − (ε_c − c)[n, d] )²

added as --reg-cls · L_reg (the authors' `--cls`, default 0.03) beside the image's denoising loss and REPA's
term, which with REG also aligns the class token's projection to the encoder's class token (the trainer puts it
first in the targets, as the authors' train.py concatenates DINOv2's x_norm_clstoken to its patch tokens).
The class token is the first encoder's (Encoder.encode_with_class: its CLS after the same final norm as its
patch tokens, or, for an encoder without one such as the CIFAR teacher, the mean of its patch tokens).
"""
from __future__ import annotations

from typing import Any

import torch

from repa_probe.errors import UserError
from repa_probe.noise import velocity_target
from repa_probe.train.terms.base import TERMS, Context, Forward


class RegClass:
    name = "reg_cls"

    def enabled(self, cfg: Any) -> bool:
        return cfg.reg_cls > 0

    def weight(self, cfg: Any, step: int) -> float:
        return cfg.reg_cls

    def check(self, cfg: Any, depth: int) -> None:
        if not cfg.encoders:
            raise UserError(f"--reg-cls {cfg.reg_cls} denoises an encoder's class token: add --encoder NAME[=WEIGHTS] "
                            f"(the first one gives it)")
        if cfg.projector == "conv" and cfg.repa_coeff > 0:
            raise UserError("--reg-cls with --projector conv: REG's class token has no place on the convolution's "
                            "token grid; use --projector mlp")

    def __call__(self, forward: Forward, cfg: Any, context: Context) -> torch.Tensor:
        target = velocity_target(forward.cls, forward.cls_noise)
        return (forward.cls_out.float() - target.float()).pow(2).mean()


TERMS.register("reg_cls", RegClass())
