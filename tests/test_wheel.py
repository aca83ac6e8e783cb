"""`pip install corinfomax` as a user gets it: a built wheel in a fresh environment, outside the checkout.

The wheel is built from the checkout and installed (no editable install) into a new virtual environment
whose only link to the test environment is a `.pth` line for the third-party dependencies (torch, timm,
transformers, ...; installing a CUDA build of torch again would take minutes). The checkout itself is never
on the path: every command runs from an empty folder, and the test checks where the package was imported
from.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from helpers import REPO_ROOT

COMMANDS = ["corinfomax-train", "corinfomax-eval", "corinfomax-finetune", "corinfomax-push",
            "corinfomax-convert-official", "corinfomax-embed", "corinfomax-export-onnx", "corinfomax-app"]  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root),
         str(REPO_ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = root.glob("corinfomax-*.whl")
    env_dir = root / "env"
    venv.create(env_dir, with_pip=False)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    # Dependencies from the test environment, appended after the new environment's own site-packages.
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    installing = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert installing.returncode == 0, installing.stderr[-3000:]
    outside = root / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="2",
               PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}")  # fmt: skip
    return {"wheel": wheel, "python": python, "bin": env_dir / "bin", "cwd": outside, "env": env}


def run(installed, *command, timeout=300):
    return subprocess.run(command, cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_wheel_holds_the_package_data_and_not_the_checkout(installed):
    import zipfile  # noqa: PLC0415

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "modeling_corinfomax/demo_data/fashion_mnist/train.parquet" in names
    assert "modeling_corinfomax/demo_data/fashion_mnist/test.parquet" in names
    assert "modeling_corinfomax/cli/train.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "train.py", "hub/"))]
    where = run(
        installed,
        str(installed["python"]),
        "-c",
        "import modeling_corinfomax; print(modeling_corinfomax.__file__)",
    )
    assert where.returncode == 0, where.stderr
    assert str(REPO_ROOT) not in where.stdout and str(installed["bin"].parent) in where.stdout


def test_each_command_answers_help(installed):
    # The commands at once (each start-up is mostly imports): one test, a third of the time.
    running = {
        command: subprocess.Popen([str(installed["bin"] / command), "--help"], cwd=installed["cwd"],
                                  env=installed["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in COMMANDS
    }  # fmt: skip
    for command, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (command, stderr[-2000:])
        assert "usage:" in stdout and "--help" in stdout, command


def test_no_argument_training_from_the_wheel_saves_a_model_automodel_loads(installed):
    # The bundled demo data, offline, from an empty folder; only the length and size are cut for CI.
    result = run(
        installed, str(installed["python"]), "-m", "accelerate.commands.launch", "--num_processes", "1",
        "-m", "modeling_corinfomax.cli.train",
        "--max_train_steps", "3", "--total_batch_size", "32", "--no-do_eval", "--output_dir", "run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((installed["cwd"] / "run" / "training_args.json").read_text())["max_train_steps"] == 3
    load = run(
        installed, str(installed["python"]), "-c",
        "from transformers import AutoModel; m = AutoModel.from_pretrained('run', trust_remote_code=True);"
        "print(type(m).__name__, m.config.backbone)",
    )  # fmt: skip
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.split() == ["CorInfoMaxModel", "resnet10t"]  # the demo's backbone
    cmd = run(installed, str(installed["bin"] / "corinfomax-train"), "--max_train_steps", "1",
              "--total_batch_size", "16", "--no-do_eval", "--output_dir", "run2")  # fmt: skip
    assert cmd.returncode == 0, cmd.stderr[-3000:]
    assert (installed["cwd"] / "run2" / "model.safetensors").is_file()
    # The saved model embeds the bundled test images with the installed command.
    embed = run(installed, str(installed["bin"] / "corinfomax-embed"), "run", "--max_samples", "48",
                "--neighbors", "3", "--output", "embeddings.parquet")  # fmt: skip
    assert embed.returncode == 0, embed.stderr[-3000:]
    import pyarrow.parquet as pq  # noqa: PLC0415

    table = pq.read_table(installed["cwd"] / "embeddings.parquet")
    assert table.num_rows == 48 and {"id", "label", "embedding", "neighbors"} <= set(table.column_names)
