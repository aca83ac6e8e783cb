"""The package's commands (console scripts of the wheel; `train.py`, `eval.py`, `finetune.py` and `hub/*.py`
in a checkout call the same `main` functions).

    corinfomax-train              = modeling_corinfomax.cli.train   (also `accelerate launch -m modeling_corinfomax.cli.train`)
    corinfomax-eval               = modeling_corinfomax.cli.eval
    corinfomax-finetune           = modeling_corinfomax.cli.finetune
    corinfomax-push               = modeling_corinfomax.cli.push
    corinfomax-convert-official   = modeling_corinfomax.cli.convert_official
    corinfomax-embed              = modeling_corinfomax.cli.embed           (also `accelerate launch embed.py`)
    corinfomax-export-onnx        = modeling_corinfomax.cli.export_onnx
    corinfomax-app                = modeling_corinfomax.cli.app

The `run_*` functions below are the console-script targets (named apart from the submodules): they import their command only when called, and exit
with 0 after a run whose `main` returns results (a dict) rather than an exit status.
"""

from __future__ import annotations

import importlib


def _run(module: str) -> None:
    status = importlib.import_module(f"modeling_corinfomax.cli.{module}").main()
    raise SystemExit(status if isinstance(status, int) else 0)


def run_train() -> None:
    _run("train")


def run_eval() -> None:
    _run("eval")


def run_finetune() -> None:
    _run("finetune")


def run_push() -> None:
    _run("push")


def run_convert_official() -> None:
    _run("convert_official")


def run_embed() -> None:
    _run("embed")


def run_export_onnx() -> None:
    _run("export_onnx")


def run_app() -> None:
    _run("app")
