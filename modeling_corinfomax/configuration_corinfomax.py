"""CorInfoMax configuration.

This file travels to the Hub as remote code: it imports only transformers and timm.
"""

from __future__ import annotations

from typing import Any

import timm
from transformers import PreTrainedConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def eval_resize_size(image_size: int) -> int:
    """The evaluation resize of the official linear evaluation: the short side goes to
    `int(image_size * 8/7)` before the centre crop of `image_size` (256 for 224, 36 for 32)."""
    return int(image_size * 8 / 7)


class CorInfoMaxConfig(PreTrainedConfig):
    r"""Configuration of a CorInfoMax model: a timm backbone, an MLP projector and the CorInfoMax loss.

    Defaults are the paper's ImageNet-1K ResNet-50 run (100 epochs, 69.08% linear top-1).

    Args:
        backbone (`str`): any timm architecture name (`timm.list_models()`), e.g. `"resnet50"`,
            `"resnet18"`, `"vit_small_patch16_224"`, `"convnext_tiny"`.
        backbone_kwargs (`dict`, *optional*): extra keyword arguments for `timm.create_model`
            (e.g. `{"img_size": 32, "patch_size": 4}` for a small ViT). `num_classes` and
            `pretrained` are set by us.
        cifar_stem (`bool`): replace the ResNet stem by a 3x3 stride-1 convolution without max-pool,
            as in the paper's CIFAR runs (its Tiny ImageNet run keeps the 7x7 stem). Only for ResNet-family backbones.
        projector_dims (`list[int]`): hidden sizes then output size of the projector MLP
            (`Linear -> [BN] -> ReLU` for each hidden size, then a bias-free `Linear`).
            `[8192, 8192, 512]` on ImageNet-1K, `[2048, 2048, 64]` on CIFAR-10.
        projector_batchnorm (`bool`): BatchNorm1d after each hidden Linear (the ImageNet-1K variant).
        normalize (`bool`): L2-normalise projections before the loss (`--normalize_on`, on in every run).
        alpha (`float`): weight of the invariance (attraction) term (`sim_loss_weight`).
        lambda_R (`float`): forgetting factor of the running covariance, in [0, 1) (`la_R`).
        lambda_mu (`float`): forgetting factor of the running mean, in [0, 1) (`la_mu`).
        R_init (`float`): the running covariances start at `R_init * I` (`R_ini`).
        eps (`float`): `eps * I` is added before each log-determinant (`R_eps_weight`).
        image_size (`int`): training and evaluation crop size.
        image_mean, image_std (`list[float]`): normalisation constants of the image processor.
        initializer_range (`float`): std of the classifier head initialisation.
    """

    model_type = "corinfomax"

    def __init__(
        self,
        backbone: str = "resnet50",
        backbone_kwargs: dict[str, Any] | None = None,
        cifar_stem: bool = False,
        projector_dims: list[int] | tuple[int, ...] = (8192, 8192, 512),
        projector_batchnorm: bool = True,
        normalize: bool = True,
        alpha: float = 2000.0,
        lambda_R: float = 0.1,
        lambda_mu: float = 0.1,
        R_init: float = 1.0,
        eps: float = 1e-8,
        image_size: int = 224,
        image_mean: list[float] | tuple[float, ...] = tuple(IMAGENET_MEAN),
        image_std: list[float] | tuple[float, ...] = tuple(IMAGENET_STD),
        initializer_range: float = 0.01,
        **kwargs,
    ):
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.cifar_stem = bool(cifar_stem)
        self.projector_dims = [int(d) for d in projector_dims]
        self.projector_batchnorm = bool(projector_batchnorm)
        self.normalize = bool(normalize)
        self.alpha = float(alpha)
        self.lambda_R = float(lambda_R)
        self.lambda_mu = float(lambda_mu)
        self.R_init = float(R_init)
        self.eps = float(eps)
        self.image_size = int(image_size)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)
        self.validate_corinfomax()

    def validate_corinfomax(self) -> None:
        """Raise a `ValueError` naming the bad value, what is accepted and the fix."""
        if not isinstance(self.backbone, str) or not timm.is_model(self.backbone):
            close = timm.list_models(f"*{str(self.backbone).split('_')[0]}*")[:8]
            raise ValueError(
                f"backbone={self.backbone!r} is not a timm architecture. Use any name from "
                f"`timm.list_models()`{' (close matches: ' + ', '.join(close) + ')' if close else ''}."
            )
        for key in ("num_classes", "pretrained"):
            if key in self.backbone_kwargs:
                raise ValueError(
                    f"backbone_kwargs must not set {key!r}: CorInfoMax builds the backbone without a "
                    "classifier and loads weights itself. Remove it."
                )
        if not self.projector_dims or any(d <= 0 for d in self.projector_dims):
            raise ValueError(
                f"projector_dims={self.projector_dims} must be a non-empty list of positive sizes "
                "(hidden sizes then output size), e.g. [2048, 2048, 64]."
            )
        for name in ("lambda_R", "lambda_mu"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(
                    f"{name}={value} is outside [0, 1): it is a forgetting factor (the paper uses 0.01 or 0.1)."
                )
        if not self.eps > 0:
            raise ValueError(
                f"eps={self.eps} must be > 0 (the paper uses 1e-8): it keeps R + eps*I invertible."
            )
        if not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0 (the paper uses 250 to 2000).")
        if not self.R_init > 0:
            raise ValueError(f"R_init={self.R_init} must be > 0 (the paper uses 1.0).")
        if self.image_size < 8:
            raise ValueError(f"image_size={self.image_size} is too small; use at least 8 (32 for CIFAR).")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"image_mean={self.image_mean} and image_std={self.image_std} must be 3 values each "
                "(RGB), with positive std."
            )

    @property
    def embedding_dim(self) -> int:
        """Output size of the projector, the `dim` of the loss."""
        return self.projector_dims[-1]


CorInfoMaxConfig.register_for_auto_class()

__all__ = ["CorInfoMaxConfig", "IMAGENET_MEAN", "IMAGENET_STD"]
