"""The retrieval app: drop an image, see the bank images nearest to it by the cosine similarity of a
model's features (`pooler_output`), and where it falls on the bank's map (first two principal components).

    demo = build_app("org/corinfomax-resnet18", "photos/", k=8)   # or the parquet file of corinfomax-embed
    demo.launch()

`corinfomax-app` (cli/app.py) serves it; a Space's `app.py` (export/space.py) is these two lines. The
search is also an API endpoint, `/search`: `gradio_client.Client(url).predict(handle_file(path),
api_name="/search")` returns the gallery, the map and the table of neighbours (rank, similarity, label,
file). `load_bank` and `BankSearch` are the same search without the interface (and without gradio).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .data import load_image_dataset, resolve_columns
from .embedding import (
    Embeddings,
    Encoder,
    Map2D,
    draw_map,
    embed_dataset,
    load_encoder,
    nearest_neighbors,
    read_embeddings,
)
from .errors import ConfigurationError, DataError
from .reporting import spread_queries

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

TABLE_HEADERS = ["rank", "similarity", "label", "file"]


def load_bank(encoder: Encoder, bank: str | os.PathLike, batch_size: int = 64) -> Embeddings:
    """The embeddings of a bank: a folder of images (class sub-folders give labels; unreadable images are
    left out with a warning) embedded now with `encoder`, or the parquet file `corinfomax-embed` wrote (its `path` column names the images; relative
    paths are read from the file's folder). Raises `DataError` for anything else, for a file written by
    another model (another embedding width) and for images that are not there."""
    bank = Path(bank)
    if bank.is_dir():
        start = time.perf_counter()
        logger.info("embedding the images of %s", bank)
        dataset = load_image_dataset(train_dir=str(bank))
        image_column, label_column = resolve_columns(dataset)
        embeddings = embed_dataset(
            encoder, dataset, image_column, label_column, batch_size=batch_size, skip_bad_images=True
        )
        logger.info("embedded %d images in %.1f s", len(embeddings), time.perf_counter() - start)
        if embeddings.bad_images:  # a demo serves the rest rather than refuse to start
            logger.warning(
                "left out %d unreadable images: %s", len(embeddings.bad_images), embeddings.bad_images
            )
        return embeddings
    if not (bank.is_file() and bank.suffix == ".parquet"):
        raise DataError(
            f"--bank {str(bank)!r} is neither a folder of images nor a .parquet file: pass a folder, or "
            "the file corinfomax-embed wrote."
        )
    embeddings = read_embeddings(bank)
    width = encoder.embed_images([Image.new("RGB", (8, 8))]).shape[1]
    if embeddings.embeddings.shape[1] != width:
        raise DataError(
            f"{bank} holds {embeddings.embeddings.shape[1]}-d embeddings, but this model's are {width}-d: "
            "it was written with another model. Embed the images again with this one (corinfomax-embed)."
        )
    if embeddings.paths is None:
        raise DataError(
            f"{bank} has no `path` column, so its images cannot be shown: write it from a folder."
        )
    embeddings.paths = [str(p if Path(p).is_absolute() else bank.parent / p) for p in embeddings.paths]
    missing = [p for p in embeddings.paths if not Path(p).is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images named in {bank} are missing (first: {missing[0]}): embed the folder "
            "again, or pass it instead of the file."
        )
    logger.info("read %d embeddings from %s", len(embeddings), bank)
    return embeddings


@dataclass
class Neighbour:
    """One bank image found for a query: its file, cosine similarity and class name."""

    path: str
    similarity: float
    label: str | None


class BankSearch:
    """A bank's embeddings, the encoder that queries them, and the bank's map.

    Args:
        encoder: what `load_encoder` returns; it embeds the queries as it embedded the bank.
        bank: the bank's `Embeddings` (`load_bank`), with their `paths`.
    """

    def __init__(self, encoder: Encoder, bank: Embeddings):
        if bank.paths is None:
            raise DataError("the bank's rows have no files to show: embed a folder of images.")
        self.encoder, self.bank = encoder, bank
        folders = [os.path.dirname(os.path.abspath(p)) for p in bank.paths]
        self.root = os.path.commonpath(folders)
        self.folders = sorted(set(folders))
        self.map_2d: Map2D | None = None

    def label(self, row: int) -> str | None:
        """The class name (or index) of a bank row, None when the bank has no labels."""
        if self.bank.labels is None or int(self.bank.labels[row]) < 0:
            return None
        index = int(self.bank.labels[row])
        names = self.bank.label_names
        return names[index] if names and index < len(names) else str(index)

    def neighbours(self, image, k: int) -> tuple[list[Neighbour], torch.Tensor]:
        """The `k` bank images most similar to `image` (PIL or a path), most similar first, and the
        image's (1, D) embedding."""
        query = self.encoder.embed_images([image])
        similarities, rows = nearest_neighbors(self.bank.embeddings, k, queries=query)
        found = [
            Neighbour(self.bank.paths[int(r)], float(s), self.label(int(r)))
            for s, r in zip(similarities[0].tolist(), rows[0].tolist())
        ]
        return found, query

    def draw(self, query: torch.Tensor | None = None):
        """The bank's map (PIL), with `query` (a (1, D) embedding) marked on the bank's own axes (fitted
        once, at the first call)."""
        if self.map_2d is None:
            self.map_2d = Map2D(self.bank.embeddings)
        placed = None if query is None else self.map_2d.place(query)
        return draw_map(
            self.map_2d.points,
            self.bank.labels,
            self.bank.label_names,
            query=None if placed is None else placed[0],
            title=f"the bank: {len(self.bank)} images (PCA of the features)",
        )

    def relative(self, path: str) -> str:
        """A bank file's path under the bank's folder, as the table shows it."""
        return os.path.relpath(os.path.abspath(path), self.root)


def build_app(
    model_name_or_path: str | os.PathLike,
    bank: str | os.PathLike,
    k: int = 8,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    batch_size: int = 64,
    examples: int = 6,
) -> gr.Blocks:
    """The retrieval app on a model and a bank, ready to `launch()`.

    Args:
        model_name_or_path: a CorInfoMax folder or Hub id (any `AutoModel` with a `pooler_output` works).
        bank: a folder of images, embedded now, or the parquet file of `corinfomax-embed` (`load_bank`).
        k: the number of neighbours shown.
        revision, trust_remote_code, device: as in `load_encoder`.
        batch_size: images per batch when embedding a folder.
        examples: how many bank images to offer as clickable examples (one class after another).

    Returns:
        A `gradio.Blocks`; the page opens on the first example's results. Its bank images are served from
        their folders (`gradio.set_static_paths`), so launching needs no `allowed_paths`.
    """
    if k < 1:
        raise ConfigurationError(f"k must be at least 1, got {k}.")
    if importlib.util.find_spec("gradio") is None:  # said now, not after embedding the bank
        raise ConfigurationError("the app needs gradio: `pip install 'corinfomax[app]'`.")
    encoder = load_encoder(
        model_name_or_path, revision=revision, trust_remote_code=trust_remote_code, device=device
    )
    search = BankSearch(encoder, load_bank(encoder, bank, batch_size))
    import gradio as gr  # noqa: PLC0415  (the `app` extra; BankSearch and load_bank work without it)

    gr.set_static_paths(search.folders)
    k = min(k, len(search.bank))
    name = str(model_name_or_path)

    def run(image):
        """The gallery (file, caption), the map and the table of the neighbours of `image` (PIL or path)."""
        if image is None:
            return [], search.draw(), []
        found, query = search.neighbours(image, k)
        gallery = [(n.path, f"{n.similarity:.4f}" + (f" · {n.label}" if n.label else "")) for n in found]
        table = [
            [i + 1, round(n.similarity, 4), n.label or "", search.relative(n.path)]
            for i, n in enumerate(found)
        ]
        return gallery, search.draw(query), table

    shown = [search.bank.paths[row] for row in spread_queries(search.bank.labels, examples, len(search.bank))]
    first_gallery, first_map, first_table = run(shown[0])
    with gr.Blocks(title=f"CorInfoMax retrieval: {name}") as demo:
        gr.Markdown(
            f"# CorInfoMax retrieval · `{name}`\n"
            f"Drop an image to find its {k} nearest neighbours among {len(search.bank)} bank images "
            f"(cosine similarity of the model's {search.bank.embeddings.shape[1]}-d features)."
        )
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                query = gr.Image(
                    value=shown[0],
                    type="pil",
                    image_mode="RGB",
                    sources=["upload", "clipboard"],
                    label="Drop an image",
                    height=260,
                )
                gr.Examples([[path] for path in shown], inputs=query, label="Bank images")
            with gr.Column(scale=2):
                gallery = gr.Gallery(
                    first_gallery,
                    label=f"The {k} nearest bank images: cosine similarity · label",
                    columns=4,
                    height="auto",
                    object_fit="contain",
                )
        with gr.Row():
            with gr.Column(scale=1):
                bank_map = gr.Image(first_map, type="pil", format="png", label="Bank map", interactive=False)
            with gr.Column(scale=1):
                table = gr.Dataframe(
                    first_table, headers=TABLE_HEADERS, label="Neighbours", interactive=False
                )
        query.change(run, inputs=query, outputs=[gallery, bank_map, table], api_name="search")
    return demo
