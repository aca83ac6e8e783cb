"""Publishing CorInfoMax checkpoints: the timm-format backbone (`timm_format`), the model cards (`cards`,
with `results` for eval_results.json) and the Hub upload (`publishing`); the encoder as ONNX (`onnx`) and the
retrieval app as a Hub Space (`space`).

A checkpoint becomes two artifacts :

- the **full model** (`org/name`): our `save_pretrained` folder with the code files, an `auto_map` for
  every head and `preprocessor_config.json`, so it loads with `trust_remote_code=True` anywhere, or
  without it where this package is imported; it is what continues SSL training;
- the **backbone** in timm's own format (`org/name-timm`): plain timm keys and a timm `config.json`, so
  it loads with `timm.create_model("hf-hub:...")`, transformers' `AutoModel` / `AutoModelForImageClassification`
  (TimmWrapper), `AutoImageProcessor` and the feature-extraction pipeline, with no custom code (a CIFAR-stem
  backbone needs `import modeling_corinfomax`, which registers `<arch>_cifar_stem` with timm).
"""

from .cards import build_backbone_card, build_model_card
from .onnx import export_onnx, read_onnx_metadata, verify_onnx
from .publishing import prepare_artifacts, publish, push_model, write_model_folder
from .results import eval_results_table, eval_results_to_model_index, parse_eval_results
from .space import publish_space, write_space_folder
from .timm_format import (
    export_timm_backbone,
    load_saved_model,
    timm_architecture,
    timm_data_config,
)

__all__ = [
    "build_backbone_card",
    "build_model_card",
    "eval_results_table",
    "eval_results_to_model_index",
    "export_onnx",
    "export_timm_backbone",
    "load_saved_model",
    "parse_eval_results",
    "prepare_artifacts",
    "publish",
    "publish_space",
    "push_model",
    "read_onnx_metadata",
    "timm_architecture",
    "timm_data_config",
    "verify_onnx",
    "write_model_folder",
    "write_space_folder",
]
