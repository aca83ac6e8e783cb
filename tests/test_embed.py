"""corinfomax-embed: the library against an independent computation (preprocessing written out in torchvision,
the model called directly, neighbours by numpy), the command under `accelerate launch` with two CPU
processes, unreadable images, and a stream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, load_dataset
from PIL import Image
from torchvision.transforms import v2

from modeling_corinfomax.cli import embed as embed_command
from modeling_corinfomax.data import BUNDLED_DATA_DIR, load_image_dataset, resolve_columns
from modeling_corinfomax.embedding import (
    draw_map,
    embed_dataset,
    load_encoder,
    nearest_neighbors,
    project_2d,
    read_embeddings,
    write_embeddings,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PHOTOS = sorted(Path("/usr/share/backgrounds/mate/nature").glob("*.jpg"))[:2]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Small CPU ops run best on one intra-op thread (two threads on two busy cores are many times slower);
    the command takes OMP_NUM_THREADS as the user's choice. The other tests keep their threads."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 real Fashion-MNIST images as PNG files in class sub-folders, and two JPEG photos in `photo/`."""
    root = tmp_path_factory.mktemp("images")
    rows = Dataset.from_parquet(str(BUNDLED_DATA_DIR / "test.parquet")).select(range(24))
    names = rows.features["label"].names
    for i, row in enumerate(rows):
        class_dir = root / names[row["label"]].replace("/", "-")  # "T-shirt/top" is one folder
        class_dir.mkdir(exist_ok=True)
        row["image"].save(class_dir / f"{i:02d}.png")
    if not PHOTOS:
        pytest.skip("no JPEG photos in /usr/share/backgrounds/mate/nature (apt-get install mate-backgrounds)")
    (root / "photo").mkdir()
    for photo in PHOTOS:
        shutil.copy(photo, root / "photo" / photo.name)
    return root


@pytest.fixture(scope="module")
def embedded(pretrained, folder, tmp_path_factory):
    """The library's embeddings of `folder`, and what they were made from."""
    _, checkpoint = pretrained
    dataset = load_image_dataset(train_dir=str(folder), cache_dir=str(tmp_path_factory.mktemp("cache")))
    image_column, label_column = resolve_columns(dataset)
    encoder = load_encoder(checkpoint)
    found = embed_dataset(encoder, dataset, image_column, label_column, batch_size=8, progress_bar=False)
    return encoder, found


def independent_view(path: str, size: int, mean, std) -> torch.Tensor:
    """The evaluation view written out: RGB, short side to int(8/7 size) (bicubic, antialiased), centre crop,
    normalise."""
    view = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(int(size * 8 / 7), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    return view(Image.open(path).convert("RGB"))


def test_embeddings_neighbours_and_file_match_an_independent_computation(
    pretrained, folder, embedded, tmp_path
):
    model, _ = pretrained
    encoder, found = embedded
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert len(found) == 26 and found.ids.tolist() == list(range(26)) and sorted(found.paths) == files
    assert found.label_names == sorted(p.name for p in folder.iterdir())
    assert [found.label_names[c] for c in found.labels] == [Path(p).parent.name for p in found.paths]
    assert found.embeddings.dtype == torch.float32 and found.bad_images == []

    # The model called directly on the same images, preprocessed independently.
    pixels = torch.stack(
        [independent_view(p, encoder.image_size, encoder.mean, encoder.std) for p in found.paths]
    )
    with torch.no_grad():
        expected = model.corinfomax(pixel_values=pixels).pooler_output
    torch.testing.assert_close(found.embeddings, expected, rtol=1e-5, atol=1e-5)
    # A query embeds as its row does.
    photo = found.paths.index(str(folder / "photo" / PHOTOS[0].name))
    queries = encoder.embed_images([Image.open(found.paths[0]), Image.open(found.paths[photo])])
    torch.testing.assert_close(queries, expected[[0, photo]], rtol=1e-5, atol=1e-5)

    # Neighbours: numpy's brute-force cosine top-k, each row leaving itself out; in blocks or not.
    x = found.embeddings.double().numpy()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cosine = x @ x.T
    np.fill_diagonal(cosine, -np.inf)
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :5]
    similarities, indices = nearest_neighbors(found.embeddings, 5, chunk=7)
    np.testing.assert_array_equal(indices.numpy(), order)
    np.testing.assert_allclose(similarities.numpy(), np.take_along_axis(cosine, order, 1), atol=1e-6)
    similarities, indices = nearest_neighbors(found.embeddings, 1, queries=queries)
    assert indices.flatten().tolist() == [0, photo] and similarities.min() > 1 - 1e-5

    # The file: loadable with `datasets`, and read back whole.
    path = write_embeddings(tmp_path / "out.parquet", found, nearest_neighbors(found.embeddings, 5))
    rows = load_dataset("parquet", data_files=str(path), cache_dir=str(tmp_path / "cache"))["train"]
    assert rows.column_names == ["id", "path", "label", "embedding", "neighbors", "neighbor_similarities"]
    assert rows["id"] == list(range(26)) and rows["path"] == found.paths
    assert rows.features["label"].names == found.label_names and rows["label"] == found.labels.tolist()
    assert torch.equal(torch.tensor(rows["embedding"]), found.embeddings)
    assert rows["neighbors"] == order.tolist()
    back = read_embeddings(path)
    assert torch.equal(back.embeddings, found.embeddings) and back.paths == found.paths
    assert torch.equal(back.neighbors[1], torch.from_numpy(order)) and back.label_names == found.label_names

    points = project_2d(found.embeddings)
    assert points.shape == (26, 2) and points.dtype == np.float32
    # A query lands on the bank's own map: a bank row queried again sits on its point, and the map is unmoved.
    same, placed = project_2d(found.embeddings, queries=found.embeddings[[photo]] * 3.0)
    assert np.array_equal(same, points) and np.allclose(placed[0], points[photo], atol=1e-6)
    picture = draw_map(
        points, found.labels, found.label_names, query=points[photo], path=tmp_path / "map.png"
    )
    assert picture.size == (650, 550) and Image.open(tmp_path / "map.png").size == (650, 550)


def test_two_launched_cpu_processes_write_every_image_once_in_row_order(
    pretrained, folder, embedded, tmp_path
):
    _, checkpoint = pretrained
    _, found = embedded
    out, picture = tmp_path / "out.parquet", tmp_path / "map.png"
    # `--multi_gpu` makes Accelerate start N processes (torchrun); without it, it starts one on a CPU machine.
    launcher = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--dynamo_backend", "no", "--mixed_precision", "no"]  # fmt: skip
    result = subprocess.run(
        [*launcher, str(REPO_ROOT / "embed.py"), str(checkpoint), "--train_dir", str(folder), "--output", str(out),
         "--neighbors", "5", "--map", str(picture), "--dataloader_num_workers", "1",
         "--per_device_batch_size", "4", "--cache_dir", str(tmp_path / "cache")],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "2 process(es)" in log
    assert "host memory: each batch reuses the memory the previous one freed" in log
    [line] = [line for line in log.splitlines() if "images/s" in line]  # the main process's line only
    assert "26 images, 512-dim embeddings" in line and str(out) in line
    back = read_embeddings(out)
    assert back.ids.tolist() == list(range(26)) and back.paths == found.paths
    assert torch.equal(back.labels, found.labels) and back.label_names == found.label_names
    torch.testing.assert_close(back.embeddings, found.embeddings, rtol=1e-5, atol=1e-5)
    assert back.neighbors[1].shape == (26, 5)
    assert Image.open(picture).format == "PNG"


def test_unreadable_images_stop_the_run_with_one_line_or_are_skipped(pretrained, folder, tmp_path, caplog):
    _, checkpoint = pretrained
    bad = tmp_path / "bad"
    for name in ("Bag", "Coat"):
        shutil.copytree(folder / name, bad / name)
    (bad / "Coat" / "000-broken.jpg").write_bytes(b"not a JPEG")
    out = tmp_path / "out.parquet"
    out.write_bytes(b"an earlier run's file")
    common = [
        str(checkpoint),
        "--train_dir",
        str(bad),
        "--output",
        str(out),
        "--cache_dir",
        str(tmp_path / "c"),
    ]
    with pytest.raises(SystemExit) as stopped:  # what the user sees: this line, exit status 1
        embed_command.main(common)
    message = str(stopped.value.code)
    assert message.startswith("error: could not read 1 image(s)") and "\n" not in message
    assert str(bad / "Coat" / "000-broken.jpg") in message and "--skip_bad_images" in message
    assert out.read_bytes() == b"an earlier run's file"

    summary = embed_command.main([*common, "--skip_bad_images"])
    assert summary["images"] == 6 and summary["bad_images"] == 1
    assert "skipped 1 unreadable image(s)" in caplog.text and "broken.jpg" in caplog.text
    back = read_embeddings(out)
    assert len(back) == 6 and all("broken" not in p for p in back.paths)
    files = sorted(str(p) for p in bad.rglob("*.*"))
    assert back.ids.tolist() == [0, 1, 2, 4, 5, 6]  # the rows of the folder, the unreadable one's left out
    assert [files[i] for i in back.ids.tolist()] == back.paths


def test_a_failed_write_leaves_the_earlier_file_whole(embedded, tmp_path, monkeypatch):
    _, found = embedded
    out = tmp_path / "out.parquet"
    out.write_bytes(b"an earlier run's file")

    def disk_full(self, path, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Dataset, "to_parquet", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_embeddings(out, found)
    assert out.read_bytes() == b"an earlier run's file" and [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--train_dir", "nowhere"], "error: --train_dir 'nowhere' is not a folder of images."),
        (["--train_dir", "{empty}"], "doesn't contain any data files"),
        (["--output", "{empty}"], "is a folder: pass a file name"),
    ],
)
def test_bad_data_or_output_is_refused_with_one_line(pretrained, tmp_path, argv, expected):
    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty") for a in argv]
    with pytest.raises(SystemExit) as stopped:
        embed_command.main([str(pretrained[1]), *argv, "--cache_dir", str(tmp_path / "cache")])
    assert str(stopped.value.code).startswith("error: ") and expected in str(stopped.value.code)


def test_a_stream_is_embedded_in_arrival_order_as_its_rows(pretrained, tmp_path):
    _, checkpoint = pretrained
    rows = Dataset.from_parquet(str(BUNDLED_DATA_DIR / "test.parquet")).select(range(30))
    stream = tmp_path / "stream"
    stream.mkdir()
    rows.select(range(15)).to_parquet(str(stream / "part-0.parquet"))
    rows.select(range(15, 30)).to_parquet(str(stream / "part-1.parquet"))
    out = tmp_path / "out.parquet"
    summary = embed_command.main(
        [str(checkpoint), "--dataset_name", str(stream), "--streaming", "--label_column", "label",
         "--max_samples", "20", "--per_device_batch_size", "8", "--output", str(out), "--neighbors", "3",
         "--cache_dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert summary["images"] == 20
    saved = load_dataset("parquet", data_files=str(out), cache_dir=str(tmp_path / "cache"))["train"]
    assert saved.column_names == ["id", "label", "embedding", "neighbors", "neighbor_similarities"]
    assert saved["id"] == list(range(20)) and saved["label"] == rows["label"][:20]
    assert saved.features["label"].names == rows.features["label"].names
    # The same rows, not streamed: the same embeddings.
    encoder = load_encoder(checkpoint)
    direct = embed_dataset(encoder, rows.select(range(20)), "image", "label", progress_bar=False)
    torch.testing.assert_close(torch.tensor(saved["embedding"]), direct.embeddings, rtol=1e-5, atol=1e-5)
