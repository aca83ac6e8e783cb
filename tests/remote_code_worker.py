"""Worker for `tests/test_modeling.py::test_checkpoint_loads_as_remote_code_without_the_package`.

Run as `python -I remote_code_worker.py CKPT INPUTS OUT` from a directory outside the repository. It
makes the installed `modeling_corinfomax` package unimportable (it is pip-installed in editable mode,
so a clean `sys.path` alone would still find it), then loads the checkpoint through every Auto class
with `trust_remote_code=True` and saves the outputs to OUT for the test to compare.
"""

import importlib.abc
import sys


class BlockInstalledPackage(importlib.abc.MetaPathFinder):
    """Refuse `modeling_corinfomax` and its submodules, as on a machine where it is not installed.
    Remote code is imported as `transformers_modules.<dir>.modeling_corinfomax`, which stays allowed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] == "modeling_corinfomax":
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


sys.meta_path.insert(0, BlockInstalledPackage())


def main() -> None:
    ckpt, inputs_path, out_path = sys.argv[1:4]
    try:
        import modeling_corinfomax  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("modeling_corinfomax is importable: the block does not work")

    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
    )
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(2)

    try:
        AutoModel.from_pretrained(ckpt, trust_remote_code=False)
    except ValueError as error:
        refused_without_flag = "trust_remote_code" in str(error)
    else:
        refused_without_flag = False

    inputs = torch.load(inputs_path)
    config = AutoConfig.from_pretrained(ckpt, trust_remote_code=True)
    base = AutoModel.from_pretrained(ckpt, trust_remote_code=True).eval()
    pretraining = AutoModelForPreTraining.from_pretrained(ckpt, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(
        ckpt, trust_remote_code=True, num_labels=10
    ).eval()
    with torch.no_grad():
        base_out = base(inputs["x1"])
        pre_out = pretraining(pixel_values=inputs["x1"], pixel_values_2=inputs["x2"])
        results = {
            "refused_without_flag": refused_without_flag,
            "modules": {
                "config": type(config).__module__,
                "base": type(base).__module__,
                "pretraining": type(pretraining).__module__,
                "classifier": type(classifier).__module__,
                "loss": type(pretraining.loss_fn).__module__,
            },
            "package_imported": any(name.partition(".")[0] == "modeling_corinfomax" for name in sys.modules),
            "pooler_output": base_out.pooler_output,
            "last_hidden_state": base_out.last_hidden_state,
            "projections": base_out.projections,
            "pretraining_loss": pre_out.loss,
            "pretraining_pooler_output": pre_out.pooler_output,
            "classifier_pooler_output": classifier.corinfomax(inputs["x1"]).pooler_output,
            "logits_shape": tuple(classifier(inputs["x1"]).logits.shape),
            "loss_state": pretraining.loss_fn.state_dict(),
        }
    torch.save(results, out_path)


if __name__ == "__main__":
    main()
