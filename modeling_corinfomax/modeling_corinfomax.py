"""CorInfoMax models: a timm backbone, an MLP projector and the CorInfoMax loss, as transformers models.

This file travels to the Hub as remote code: it imports only torch, transformers, timm and its siblings.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import timm
import torch
from timm.models import build_model_with_cfg
from torch import nn
from transformers import BitImageProcessor, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention
from transformers.utils import ModelOutput, logging

from .configuration_corinfomax import CorInfoMaxConfig, eval_resize_size
from .loss import CorInfoMaxLoss

logger = logging.get_logger(__name__)

CIFAR_STEM_SUFFIX = "_cifar_stem"

# Written into every saved config, so each head loads with `trust_remote_code=True` where our package
# is not installed (transformers itself only records the class being saved).
AUTO_MAP = {
    "AutoConfig": "configuration_corinfomax.CorInfoMaxConfig",
    "AutoModel": "modeling_corinfomax.CorInfoMaxModel",
    "AutoModelForPreTraining": "modeling_corinfomax.CorInfoMaxForPreTraining",
    "AutoModelForImageClassification": "modeling_corinfomax.CorInfoMaxForImageClassification",
}


def make_image_processor(config: CorInfoMaxConfig) -> BitImageProcessor:
    """The evaluation preprocessing as a built-in transformers processor (no custom code needed):
    convert to RGB, resize the short side to `image_size * 8/7` (bicubic), centre-crop `image_size`,
    rescale to [0, 1] and normalise, as the official linear evaluation."""
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": eval_resize_size(config.image_size)},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": config.image_size, "width": config.image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        do_convert_rgb=True,
    )


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Turn a timm ResNet-family model into its CIFAR variant: 3x3 stride-1 first conv, no max-pool.

    The new convolution outputs as many channels as the old stem did (`bn1.num_features`), so the rest
    of the network is unchanged; this is the paper's CIFAR stem, with nn.Conv2d's default init.
    """
    if not (hasattr(model, "conv1") and hasattr(model, "bn1") and hasattr(model, "maxpool")):
        raise ValueError(
            f"cifar_stem=True needs a ResNet-family backbone (with conv1/bn1/maxpool); "
            f"{type(model).__name__} has none. Use a ResNet (e.g. resnet18) or set cifar_stem=False "
            "(for ViTs, pass backbone_kwargs such as {'img_size': 32, 'patch_size': 4})."
        )
    in_chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    # PyTorch's default conv init (kaiming_uniform, a=sqrt(5)), as the official CIFAR stem; `_init_weights`
    # leaves backbone modules alone, so it survives `post_init`.
    model.conv1 = nn.Conv2d(in_chans, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        model.pretrained_cfg = {**model.pretrained_cfg, "first_conv": "conv1"}
    if isinstance(getattr(model, "_traits", None), dict):
        # timm reads the input conv from its traits (pretrained loading, `save_for_hf`); a deep stem
        # (`conv1.0`, e.g. resnet10t) no longer exists.
        model._traits = {**model._traits, "first_conv": "conv1"}
    return model


def register_cifar_stem_architecture(architecture: str) -> str:
    """Register `<architecture>_cifar_stem` with timm, so timm-format exports of CIFAR-stem backbones
    load through `timm.create_model` and transformers' TimmWrapper. Returns the registered name."""
    name = architecture + CIFAR_STEM_SUFFIX
    if timm.is_model(name):
        return name
    base_cfg = timm.models.get_pretrained_cfg(architecture)
    # Architecture metadata only, no weight source: `pretrained=True` needs one from the caller
    # (`local-dir:`, `hf-hub:`, or `pretrained_cfg_overlay=dict(file=...)`).
    default_cfg = {
        "architecture": name,
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "first_conv": "conv1",
        "classifier": base_cfg.classifier if base_cfg is not None else "fc",
    }

    def _create(**kwargs) -> nn.Module:
        return apply_cifar_stem(timm.create_model(architecture, pretrained=False, **kwargs))

    def _entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        # timm's builder creates the model, stem included, and only then loads `pretrained` weights
        # from whatever source the pretrained_cfg names, as for any timm model.
        if not kwargs.get("pretrained_cfg"):
            kwargs["pretrained_cfg"] = dict(default_cfg)
        return build_model_with_cfg(_create, name, pretrained, **kwargs)

    _entrypoint.__name__ = name
    _entrypoint.__qualname__ = name
    timm.models.register_model(_entrypoint)
    # register_model also lists the name in this module's __all__, which would break `import *`.
    if name in __all__:
        __all__.remove(name)
    return name


def create_backbone(config: CorInfoMaxConfig) -> nn.Module:
    """The timm backbone without classifier (`num_classes=0`), with the CIFAR stem if asked."""
    model = timm.create_model(config.backbone, pretrained=False, num_classes=0, **config.backbone_kwargs)
    return apply_cifar_stem(model) if config.cifar_stem else model


def build_projector(in_dim: int, dims: list[int], batchnorm: bool) -> nn.Sequential:
    """`Linear -> [BatchNorm1d] -> ReLU` per hidden size, then a bias-free `Linear` (official key layout)."""
    layers: list[nn.Module] = []
    for hidden in dims[:-1]:
        layers += [nn.Linear(in_dim, hidden)]
        layers += [nn.BatchNorm1d(hidden)] if batchnorm else []
        layers += [nn.ReLU(inplace=True)]
        in_dim = hidden
    layers.append(nn.Linear(in_dim, dims[-1], bias=False))
    return nn.Sequential(*layers)


@dataclass
class CorInfoMaxModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, channels, height, width)` or
            `(batch_size, tokens, hidden_size)`): the backbone's last feature map or token sequence.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, num_features)`): the pooled, pre-projector
            embedding: the representation downstream tasks use.
        projections (`torch.FloatTensor` of shape `(batch_size, projector_dims[-1])`): projector output
            (not normalised), or `None` for a model built without projector.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None


@dataclass
class CorInfoMaxForPreTrainingOutput(ModelOutput):
    """
    Args:
        loss (`torch.DoubleTensor` scalar): the CorInfoMax loss of the (global) batch.
        invariance_loss (`torch.DoubleTensor` scalar): mean squared distance of the normalised projections.
        covariance_loss (`torch.DoubleTensor` scalar): minus the mean log-determinant term.
        projections (`torch.FloatTensor` of shape `(batch_size, projector_dims[-1])`): view-1 projections.
        projections_2 (`torch.FloatTensor` of shape `(batch_size, projector_dims[-1])`): view-2 projections.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, num_features)`): view-1 embeddings.
        error (`str`, *optional*): with the loss's `on_error="report"`, the message of a numerical fault
            (the loss is then NaN and the loss state unchanged); None otherwise.
    """

    loss: torch.FloatTensor | None = None
    invariance_loss: torch.FloatTensor | None = None
    covariance_loss: torch.FloatTensor | None = None
    projections: torch.FloatTensor | None = None
    projections_2: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    error: str | None = None


class CorInfoMaxPreTrainedModel(PreTrainedModel):
    """Weight init and checkpoint conventions shared by the CorInfoMax models."""

    config_class = CorInfoMaxConfig
    base_model_prefix = "corinfomax"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = []

    def _init_weights(self, module: nn.Module) -> None:
        # transformers 5 re-initialises every submodule by default; timm's own init of the backbone
        # (zero-init of the last BN in residual blocks, trunc-normal ViT weights...) must survive.
        # Only our heads are initialised here, through the guarded `init` functions so that weights
        # loaded by `from_pretrained` are never touched.
        if getattr(module, "_corinfomax_head", False):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    if layer is getattr(self, "classifier", None):
                        init.normal_(layer.weight, std=self.config.initializer_range)
                    else:  # PyTorch's default Linear init, as the official projector
                        init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                    if layer.bias is not None:
                        bound = 1 / math.sqrt(layer.in_features)
                        if layer is getattr(self, "classifier", None):
                            init.zeros_(layer.bias)
                        else:
                            init.uniform_(layer.bias, -bound, bound)
                elif isinstance(layer, nn.BatchNorm1d):
                    init.ones_(layer.weight)
                    init.zeros_(layer.bias)
        elif hasattr(module, "init_non_persistent_buffers"):
            # timm modules whose non-persistent buffers (e.g. relative position indices) are not in
            # checkpoints and are left on the meta device by `from_pretrained`.
            module.init_non_persistent_buffers()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the `auto_map` of every head and the image processor
        config, so the folder (or Hub repo) serves `AutoModel*`, `AutoImageProcessor` and `pipeline`."""
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            make_image_processor(self.config).save_pretrained(save_directory)
        return result

    # The corinfomax package (its `__init__`) sets this to its publishing code's `push_model`. Loaded as
    # remote code without the package, it stays None: this file imports only torch, transformers, timm
    # and its siblings, never the publishing code.
    hub_pusher = None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        tags: list[str] | None = None,
        run_dir: str | os.PathLike | None = None,
        **hub_kwargs,
    ):
        """`PreTrainedModel.push_to_hub` (the same arguments, one commit to one repo) uploading what our
        publishing path uploads for the full model: our model card (tags with `custom_code`, usage, the
        hyperparameter table and, from `run_dir`, the training arguments, results and pictures), the code
        files, the `auto_map` of every head and `preprocessor_config.json`.

        Why this shape: `export.publish` writes the full model's folder with `export.write_model_folder`,
        and so does this method (through `export.push_model`, the `hub_pusher` the package installs), so
        both give the same card and files by construction. The upload itself keeps transformers' contract
        (`create_pr`, `commit_description`, files already in the repo are kept, no second repo), where
        `publish` mirrors a checkpoint into two repos; use `publish` on a `save_pretrained` folder to ship
        the timm-format backbone too. Loaded as remote code, without the `corinfomax` package, the model
        pushes with transformers' generic card, tagged `corinfomax` and `custom_code`, and a warning says
        how to get the full card.

        Args:
            repo_id, tags, **hub_kwargs: as in transformers (`commit_message`, `commit_description`,
                `private`, `token`, `revision`, `create_pr`, `max_shard_size`); `tags` are added to the
                card's.
            run_dir: a training output folder (train.py's `--output_dir`) whose `training_args.json`,
                `eval_results.json` and pictures describe these weights; they go into the card and the
                repo. Never guessed from where the model was loaded: its weights may have changed since.

        Returns:
            The `huggingface_hub.CommitInfo` of the commit.
        """
        pusher = type(self).hub_pusher
        if pusher is not None:
            return pusher(self, repo_id, tags=tags, run_dir=run_dir, **hub_kwargs)
        if run_dir is not None:
            raise ValueError(
                f"run_dir={str(run_dir)!r} needs the corinfomax package (`pip install corinfomax`): this "
                "model was loaded as remote code. Install it, or push without run_dir."
            )
        logger.warning(
            "CorInfoMax model loaded as remote code: pushing with transformers' generic model card. "
            "Install the corinfomax package for the full card (usage, hyperparameters, results)."
        )
        # transformers drops repeated tags.
        return super().push_to_hub(repo_id, tags=["corinfomax", "custom_code", *(tags or [])], **hub_kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        for module in self.modules():
            if isinstance(module, CorInfoMaxModel):
                module.backbone.set_grad_checkpointing(enable)


class CorInfoMaxModel(CorInfoMaxPreTrainedModel):
    """A timm backbone and the CorInfoMax projector.

    `pooler_output` is the pre-projector embedding (what linear probes, kNN and fine-tuning use);
    `projections` is the projector output the loss sees.
    """

    # A pretraining checkpoint also holds the loss's running state: expected, not worth a warning.
    _keys_to_ignore_on_load_unexpected = [r"loss_fn\."]

    def __init__(self, config: CorInfoMaxConfig, add_projector: bool = True):
        super().__init__(config)
        self.backbone = create_backbone(config)
        self.num_features = self.backbone.num_features
        self.projector = None
        if add_projector:
            self.projector = build_projector(
                self.num_features, config.projector_dims, config.projector_batchnorm
            )
            self.projector._corinfomax_head = True
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs
    ) -> CorInfoMaxModelOutput | tuple:
        """pixel_values: (batch_size, 3, height, width) normalised images."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features = self.backbone.forward_features(pixel_values)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        projections = self.projector(pooled) if self.projector is not None else None
        out = CorInfoMaxModelOutput(last_hidden_state=features, pooler_output=pooled, projections=projections)
        return out if return_dict else out.to_tuple()


class CorInfoMaxForPreTraining(CorInfoMaxPreTrainedModel):
    """CorInfoMax pretraining: two views in, the CorInfoMax loss out.

    The loss's running covariance estimates are persistent float64 buffers (`loss_fn.R1`, ...), so
    `save_pretrained` and training checkpoints carry them and a resumed run continues exactly.
    """

    def __init__(self, config: CorInfoMaxConfig):
        super().__init__(config)
        self.corinfomax = CorInfoMaxModel(config)
        self.loss_fn = CorInfoMaxLoss.from_config(config)
        self.post_init()

    def batchnorm_statistics(self) -> list[torch.Tensor]:
        """The buffers a forward pass updates outside the loss (BatchNorm running means, variances and
        counts), to snapshot before a step and restore after a faulty one; the loss's running covariances
        are updated only by a successful step."""
        return [buffer for name, buffer in self.named_buffers() if not name.startswith("loss_fn.")]

    @property
    def numerical_faults(self) -> str:
        """What a numerical fault of the loss does: "raise" (`CorInfoMaxNumericalError`, the default) or
        "report" (a NaN loss with `error` set in the output, the state untouched), for a loop that skips."""
        return self.loss_fn.on_error

    @numerical_faults.setter
    def numerical_faults(self, policy: str) -> None:
        if policy not in ("raise", "report"):
            raise ValueError(f"numerical_faults={policy!r}: use 'raise' or 'report'.")
        self.loss_fn.on_error = policy

    @property
    def covariance_estimates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss's running covariance estimates of the two views' projections, (D, D) float64 each."""
        return self.loss_fn.R1, self.loss_fn.R2

    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_2: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CorInfoMaxForPreTrainingOutput | tuple:
        """pixel_values, pixel_values_2: (batch_size, 3, height, width), the two augmented views."""
        if pixel_values_2 is None:
            raise ValueError(
                "CorInfoMaxForPreTraining needs two views: call model(pixel_values=view1, pixel_values_2=view2). "
                "For features of single images use CorInfoMaxModel (AutoModel)."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # The views go through the backbone separately, as in the official code: BatchNorm statistics
        # are per view.
        out1 = self.corinfomax(pixel_values)
        out2 = self.corinfomax(pixel_values_2)
        loss = self.loss_fn(out1.projections, out2.projections)
        out = CorInfoMaxForPreTrainingOutput(
            loss=loss.loss,
            invariance_loss=loss.invariance_loss,
            covariance_loss=loss.covariance_loss,
            projections=out1.projections,
            projections_2=out2.projections,
            pooler_output=out1.pooler_output,
            error=loss.error,
        )
        return out if return_dict else out.to_tuple()


class CorInfoMaxForImageClassification(CorInfoMaxPreTrainedModel):
    """A CorInfoMax backbone with a linear head, for linear probing (`freeze_backbone=True`) or fine-tuning.

    Loads from any CorInfoMax checkpoint (pretraining or base model); only `classifier` is new.
    """

    _keys_to_ignore_on_load_unexpected = [r"loss_fn\.", r"projector\."]

    def __init__(self, config: CorInfoMaxConfig, freeze_backbone: bool = False):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.corinfomax = CorInfoMaxModel(config, add_projector=False)
        self.classifier = nn.Linear(self.corinfomax.num_features, config.num_labels)
        self.classifier._corinfomax_head = True
        self.freeze_backbone = False
        self.post_init()
        if freeze_backbone:
            self.set_freeze_backbone(True)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; `freeze_backbone=True` may be passed and is kept."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # tuple with output_loading_info=True
        if model.freeze_backbone:
            # transformers 5 swaps in new `requires_grad=True` parameters while loading, after __init__.
            model.set_freeze_backbone(True)
        return loaded

    def set_freeze_backbone(self, freeze: bool = True) -> None:
        """Freeze the backbone (no gradients, BatchNorm kept in eval mode) for linear probing."""
        self.freeze_backbone = freeze
        self.corinfomax.requires_grad_(not freeze)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "freeze_backbone", False):
            self.corinfomax.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        """pixel_values: (batch_size, 3, height, width); labels: (batch_size,) class indices."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            pooled = self.corinfomax(pixel_values).pooler_output
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
        if not return_dict:
            return (loss, logits) if loss is not None else (logits,)
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


CorInfoMaxModel.register_for_auto_class("AutoModel")
CorInfoMaxForPreTraining.register_for_auto_class("AutoModelForPreTraining")
CorInfoMaxForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "AUTO_MAP",
    "CorInfoMaxForImageClassification",
    "CorInfoMaxForPreTraining",
    "CorInfoMaxModel",
    "CorInfoMaxPreTrainedModel",
    "apply_cifar_stem",
    "build_projector",
    "create_backbone",
    "make_image_processor",
    "register_cifar_stem_architecture",
]
