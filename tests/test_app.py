"""The retrieval app as a person uses it: `corinfomax-app` started in a subprocess and queried with
gradio_client, its page rendered by headless Chromium; the Space `corinfomax-push --space` writes (whose
app.py really starts) and uploads (to the loopback Hub of tests/hub_stub.py); a parquet bank.

One app and one Space app serve the whole module (started together, once); the bank is 30 Fashion-MNIST
images in class folders; the model is conftest's tiny `pretrained`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from hub_stub import HubStub
from huggingface_hub import SpaceCard
from PIL import Image

from modeling_corinfomax.data import BUNDLED_DATA_DIR

gradio_client = pytest.importorskip(
    "gradio_client", reason="the app's tests need the `app` extra: pip install 'corinfomax[app]'"
)

REPO_ROOT = Path(__file__).resolve().parents[1]
K = 8
SCREENSHOT_COPY = Path("/tmp/app_screenshot.png")  # where the screenshot is left for a person to look at
MODEL_REPO, SPACE_REPO = "org/tiny-app", "org/tiny-app-demo"
TOKEN = "hf_stub_app_token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(tmp: Path, **extra: str) -> dict[str, str]:
    """Offline, no telemetry, unbuffered (the URL line arrives at once), gradio's files under `tmp`."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "PYTHONUNBUFFERED": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        **extra,
    }


class Process:
    """A command started in the background, its output collected as it comes: an app (`url` waits for
    its "Running on local URL" line) or a command that ends (`finish`)."""

    def __init__(self, command: list[str], env: dict, cwd: Path):
        self.command, self.lines = command, []
        self.process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def url(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in map(re.compile(r"Running on local URL:\s+(\S+)").search, self.lines) if m]
            if found:
                return found[0].group(1).rstrip("/") + "/"
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.command[1:4]} did not start:\n{''.join(self.lines)[-4000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> str:
        """Wait for the command to end; its output, after checking that it succeeded."""
        status = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        output = "".join(self.lines)
        assert status == 0, f"{self.command[1:4]} failed:\n{output[-4000:]}"
        return output

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def bank(tmp_path_factory) -> Path:
    """30 Fashion-MNIST PNGs, 3 per class, in one folder per class (the labels)."""
    rows = Dataset.from_parquet(str(BUNDLED_DATA_DIR / "train.parquet")).select(range(300))
    names = rows.features["label"].names
    folder, count = tmp_path_factory.mktemp("app") / "bank", {}
    for i, row in enumerate(rows):
        label = row["label"]
        if count.get(label, 0) < 3:
            count[label] = count.get(label, 0) + 1
            (folder / re.sub(r"\W+", "_", names[label])).mkdir(parents=True, exist_ok=True)
            row["image"].save(folder / re.sub(r"\W+", "_", names[label]) / f"{i:03d}.png")
    assert sum(count.values()) == 30
    return folder


@pytest.fixture(scope="module")
def hub():
    with HubStub(token=TOKEN) as stub:
        yield stub


@pytest.fixture(scope="module")
def started(pretrained, bank, hub, tmp_path_factory):
    """Everything that runs in another process, started together (one start each for the module):

    - `app`: `python -m modeling_corinfomax.cli.app MODEL --bank FOLDER --port P`, as a user runs it;
    - `upload`: `corinfomax-push MODEL --repo_id ... --space ... --space_bank FOLDER` to the stub Hub;
    - `space`: the Space folder `corinfomax-push --dry_run` wrote (`dry_run`, in this process while
      the others start), running its own `python app.py` with the model pointed at the local folder.
    """
    tmp = tmp_path_factory.mktemp("started")
    model = str(pretrained[1])
    command = [sys.executable, "-m", "modeling_corinfomax.cli.app", model, "--bank", str(bank)]
    app = Process([*command, "--k", str(K), "--port", str(free_port())], app_env(tmp), REPO_ROOT)
    push = [model, "--repo_id", MODEL_REPO, "--space", SPACE_REPO, "--space_bank", str(bank)]
    hub_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    hub_env.update(
        HF_ENDPOINT=hub.endpoint,  # read at import: hence a subprocess
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp / "hf_home"),
        HF_TOKEN=TOKEN,
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    upload = Process([sys.executable, "-m", "modeling_corinfomax.cli.push", *push], hub_env, tmp)
    processes = [app, upload]
    try:
        from modeling_corinfomax.cli.push import main as push_main  # noqa: PLC0415

        assert push_main([*push, "--dry_run", str(tmp / "dry_run")]) == 0
        space_dir = tmp / "dry_run" / SPACE_REPO.replace("/", "--")
        space_env = app_env(tmp, CORINFOMAX_MODEL=model, GRADIO_SERVER_PORT=str(free_port()))
        processes.append(Process([sys.executable, "app.py"], space_env, space_dir))
        yield {"app": app, "upload": upload, "space": processes[2], "dry_run": tmp / "dry_run"}
    finally:
        for process in processes:
            process.stop()


@pytest.fixture(scope="module")
def client(started, tmp_path_factory):
    """A gradio_client of the app."""
    downloads = tmp_path_factory.mktemp("downloads")
    return gradio_client.Client(started["app"].url(), verbose=False, download_files=str(downloads))


def independent_embeddings(model_dir: Path, paths: list[Path]) -> np.ndarray:
    """L2-normalised `pooler_output` of `paths` from the saved model, preprocessed as the app's
    evaluation view (RGB, short side to 8/7 of the crop, bicubic with antialiasing, centre crop, the
    config's mean/std): torchvision and numpy, nothing of the app or of `embedding`."""
    from torchvision.transforms import InterpolationMode, v2  # noqa: PLC0415
    from transformers import AutoModel  # noqa: PLC0415

    model = AutoModel.from_pretrained(model_dir).eval()
    size = model.config.image_size
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(int(size * 8 / 7), InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(model.config.image_mean, model.config.image_std),
        ]
    )
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        features = model(pixel_values=pixels).pooler_output.numpy().astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def table_rows(result) -> list[tuple[str, float, str]]:
    """`(file, similarity, label)` of each neighbour in the app's table (the search's third output)."""
    table = result[2]
    assert table["headers"] == ["rank", "similarity", "label", "file"]
    return [(file, similarity, label) for _, similarity, label, file in table["data"]]


def test_search_matches_an_independent_cosine_ranking(client, bank, pretrained):
    files = sorted(p.relative_to(bank).as_posix() for p in bank.rglob("*.png"))
    query = files[7]
    result = client.predict(gradio_client.handle_file(str(bank / query)), api_name="/search")
    gallery, bank_map, _ = result
    rows = table_rows(result)

    features = independent_embeddings(pretrained[1], [bank / f for f in files])
    similarity = features @ features[files.index(query)]
    order = np.argsort(-similarity, kind="stable")[:K]
    assert len(rows) == len(gallery) == K
    # The query is a bank image: its own first neighbour, at similarity 1.
    assert rows[0][0] == query and rows[0][1] == pytest.approx(1.0, abs=1e-4)
    for rank, (file, shown, label) in enumerate(rows):
        assert shown == pytest.approx(similarity[files.index(file)], abs=1e-4), (rank, file)
        assert label == Path(file).parent.name
        # The same file at each rank, unless two similarities are too close to order (float noise).
        gap = abs(similarity[order[rank]] - similarity[files.index(file)])
        assert file == files[order[rank]] or gap < 1e-5, (rank, file, files[order[rank]])
    assert [g["caption"] for g in gallery] == [f"{s:.4f} · {label}" for _, s, label in rows]
    assert Image.open(gallery[0]["image"]).tobytes() == Image.open(bank / query).tobytes()
    assert Image.open(bank_map).size[0] > 300  # the map, with the query marked


def test_page_renders_in_headless_chromium(started, pretrained, tmp_path):
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if browser is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the page's screenshot is not checked")
    screenshot = tmp_path / "app_screenshot.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000"]
    command += [f"--screenshot={screenshot}", "--window-size=1280,1100", "--dump-dom", started["app"].url()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"screenshot of the app: {screenshot} (copied to {SCREENSHOT_COPY})")

    picture = np.asarray(Image.open(screenshot).convert("RGB"))
    assert picture.shape[:2] == (1100, 1280)
    colours = len(np.unique(picture.reshape(-1, 3), axis=0))
    drawn_rows = (picture.std(axis=(1, 2)) > 1).mean()
    assert colours > 500 and drawn_rows > 0.5, (colours, drawn_rows)  # not a blank page
    # Rendered by the page's scripts (the config JSON in the page holds the same words, so look for tags).
    assert f"<title>CorInfoMax retrieval: {pretrained[1]}</title>" in dom
    assert "<h1>CorInfoMax retrieval" in dom
    assert re.search(r'<img [^>]*alt="1\.0000 · \w+"', dom), "the opening query's gallery is not drawn"


def test_push_dry_run_writes_a_gradio_space(started, bank):
    space = started["dry_run"] / SPACE_REPO.replace("/", "--")
    card = SpaceCard.load(space / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.models) == ("gradio", "app.py", [MODEL_REPO])
    assert card.data.sdk_version == metadata.version("gradio")  # the gradio the tests ran the app on
    requirements = (space / "requirements.txt").read_text().split()
    assert requirements[0].startswith("corinfomax~=") and requirements[1].startswith("gradio>=6")
    assert f'"{MODEL_REPO}"' in (space / "app.py").read_text()
    copied = sorted(p.relative_to(space / "bank") for p in (space / "bank").rglob("*"))
    assert copied == sorted(p.relative_to(bank) for p in bank.rglob("*"))  # the class folders too
    assert {p.name for p in started["dry_run"].iterdir()} == {
        "org--tiny-app",
        "org--tiny-app-timm",
        "org--tiny-app-demo",
    }


def test_the_written_space_app_starts_and_answers(started, tmp_path):
    space = gradio_client.Client(started["space"].url(), verbose=False, download_files=str(tmp_path))
    bank = started["dry_run"] / SPACE_REPO.replace("/", "--") / "bank"
    query = sorted(bank.rglob("*.png"))[0]
    rows = table_rows(space.predict(gradio_client.handle_file(str(query)), api_name="/search"))
    assert len(rows) == K and rows[0][0] == query.relative_to(bank).as_posix()


def test_push_uploads_the_space_next_to_the_model(started, hub):
    printed = started["upload"].finish()
    result = json.loads(printed[printed.index("{\n") :])
    assert not hub.unhandled, hub.unhandled
    space, files = hub.repos[f"spaces/{SPACE_REPO}"], hub.files(f"spaces/{SPACE_REPO}")
    assert space.sdk == "gradio" and result["space_commit"]["oid"] == space.branches["main"]
    assert {"app.py", "requirements.txt", "README.md", ".gitattributes"} <= set(files)
    assert sum(path.startswith("bank/") for path in files) == 30
    written = started["dry_run"] / SPACE_REPO.replace("/", "--")
    for name in ("app.py", "requirements.txt"):
        assert files[name] == (written / name).read_bytes()  # what the dry run wrote
    assert f"- {MODEL_REPO}" in files["README.md"].decode()
    assert {MODEL_REPO, f"{MODEL_REPO}-timm"} <= set(hub.repos)  # the model, published first
    assert TOKEN not in printed


def test_parquet_bank_gives_the_folder_banks_neighbours(client, pretrained, bank, tmp_path):
    from modeling_corinfomax.app import BankSearch, load_bank  # noqa: PLC0415
    from modeling_corinfomax.data import load_image_dataset, resolve_columns  # noqa: PLC0415
    from modeling_corinfomax.embedding import embed_dataset, load_encoder, write_embeddings  # noqa: PLC0415

    encoder = load_encoder(pretrained[1])
    dataset = load_image_dataset(train_dir=str(bank))
    write_embeddings(tmp_path / "bank.parquet", embed_dataset(encoder, dataset, *resolve_columns(dataset)))
    search = BankSearch(encoder, load_bank(encoder, tmp_path / "bank.parquet"))
    query = sorted(bank.rglob("*.png"))[12]
    found, _ = search.neighbours(Image.open(query), K)
    from_folder = table_rows(client.predict(gradio_client.handle_file(str(query)), api_name="/search"))
    assert [(search.relative(n.path), n.label) for n in found] == [(f, label) for f, _, label in from_folder]
    assert [n.similarity for n in found] == pytest.approx([s for _, s, _ in from_folder], abs=1e-4)


def test_bad_model_or_bank_is_one_error_line(pretrained, bank, tmp_path):
    from modeling_corinfomax.cli.app import main  # noqa: PLC0415

    with pytest.raises(SystemExit, match=r"^error: cannot load the model .*nope"):
        main([str(tmp_path / "nope"), "--bank", str(bank)])
    with pytest.raises(SystemExit, match=r"^error: --bank .*missing.* is neither a folder"):
        main([str(pretrained[1]), "--bank", str(tmp_path / "missing")])
