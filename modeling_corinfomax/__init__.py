"""CorInfoMax self-supervised learning as a Hugging Face transformers model on any timm backbone.

Importing this package registers the Auto classes (`AutoConfig`, `AutoModel`, `AutoModelForPreTraining`,
`AutoModelForImageClassification`) for `model_type="corinfomax"`, and registers with timm the
CIFAR-stem variants of the ResNet family (`<arch>_cifar_stem`) used by timm-format exports, and gives the
models' `push_to_hub` the package's model card (`CorInfoMaxPreTrainedModel.hub_pusher`).
"""

import timm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_corinfomax import CorInfoMaxConfig
from .loss import (
    CorInfoMaxLoss,
    CorInfoMaxLossOutput,
    CorInfoMaxNumericalError,
    covariance_eigenvalues,
    effective_rank,
    gather_with_grad,
    ld_mutual_information,
    rankme,
)
from .modeling_corinfomax import (
    CorInfoMaxForImageClassification,
    CorInfoMaxForPreTraining,
    CorInfoMaxModel,
    CorInfoMaxPreTrainedModel,
    make_image_processor,
    register_cifar_stem_architecture,
)

__version__ = "0.1.0"

AutoConfig.register("corinfomax", CorInfoMaxConfig, exist_ok=True)
AutoModel.register(CorInfoMaxConfig, CorInfoMaxModel, exist_ok=True)
AutoModelForPreTraining.register(CorInfoMaxConfig, CorInfoMaxForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(CorInfoMaxConfig, CorInfoMaxForImageClassification, exist_ok=True)

for _architecture in timm.list_models(module="resnet"):
    register_cifar_stem_architecture(_architecture)


def _push_model(model, repo_id: str, **kwargs):
    """`model.push_to_hub` with our card and files: `export.push_model`, imported when first used (the
    publishing code pulls in the Hub client's card and upload modules, which training does not need)."""
    from .export import push_model  # noqa: PLC0415

    return push_model(model, repo_id, **kwargs)


# The model file travels as remote code and cannot import the publishing code: the package hands it over.
CorInfoMaxPreTrainedModel.hub_pusher = staticmethod(_push_model)

__all__ = [
    "CorInfoMaxConfig",
    "CorInfoMaxForImageClassification",
    "CorInfoMaxForPreTraining",
    "CorInfoMaxLoss",
    "CorInfoMaxLossOutput",
    "CorInfoMaxModel",
    "CorInfoMaxNumericalError",
    "CorInfoMaxPreTrainedModel",
    "covariance_eigenvalues",
    "effective_rank",
    "gather_with_grad",
    "ld_mutual_information",
    "make_image_processor",
    "rankme",
    "register_cifar_stem_architecture",
]
