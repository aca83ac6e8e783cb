"""The one way to reach the model under the training wrappers (DDP / DataParallel and `torch.compile`, as
Accelerate's `extract_model_from_parallel` removes them) and the `CorInfoMaxModel` (backbone + projector)
inside any of our heads."""

from __future__ import annotations

from accelerate.utils import extract_model_from_parallel
from torch import nn

from .modeling_corinfomax import CorInfoMaxModel


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / DataParallel / `torch.compile` wrappers."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def corinfomax_encoder(model: nn.Module) -> CorInfoMaxModel:
    """The `CorInfoMaxModel` inside `model` (itself, or the `corinfomax` of a head), wrappers removed."""
    model = unwrap(model)
    if isinstance(model, CorInfoMaxModel):
        return model
    inner = getattr(model, "corinfomax", None)
    if isinstance(inner, CorInfoMaxModel):
        return inner
    raise TypeError(
        f"expected a CorInfoMax model (CorInfoMaxModel, CorInfoMaxForPreTraining or "
        f"CorInfoMaxForImageClassification), got {type(model).__name__}. Load the checkpoint with "
        "CorInfoMaxForPreTraining.from_pretrained(path) first."
    )
