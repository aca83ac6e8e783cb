"""JPEG decoding on the training device (`--decode_on_device`): DataLoader workers only read each file's
bytes and header and draw its two crop boxes (`JpegBytesDataset`); the training process decodes the whole
batch at once with `torchvision.io.decode_jpeg(..., device=...)` (nvJPEG on a CUDA GPU) and cuts both views
from the decoded images with the batched antialiased bicubic crop of the image cache (`decode_views`).

The boxes are the ones the per-image path draws for the same `(seed, epoch, index)`, so a run sees the same
crops whichever path decodes them: to within the batched crop's 2/255 where the host decodes at full size,
and within the reduced-scale decode's difference (`decoding.decode_crops`) where it does not. Images that are not baseline RGB or
grayscale JPEGs (PNG, CMYK JPEG, ...), and JPEGs the device cannot decode, are decoded and cropped on the
host as the per-image path does, so no image is lost to the device path.
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ..errors import DataError
from .augmentation import TwoViewAugmentation
from .decoding import baseline_jpeg, decode_crops, open_image, read_bytes
from .geometry import CropBox, batched_resized_crop

# Decoded images are padded to the batch's largest size for the batched crop; a chunk of the batch holds at
# most this many pixels (x3 channels, float32: 1 GiB), so a few huge photos do not exhaust the device.
MAX_CHUNK_PIXELS = 2**26


def boxes_tensor(boxes: tuple[CropBox, ...]) -> torch.Tensor:
    """(views, 5) int64: top, left, height, width, flip."""
    return torch.tensor([[b.top, b.left, b.height, b.width, int(b.flip)] for b in boxes], dtype=torch.long)


def crop_example(augmentation: TwoViewAugmentation, cell, size: int, seed: int) -> dict:
    """One training row for the device path: the JPEG's bytes and both views' boxes, or, for an image the
    device cannot decode, its two crops made on the host (as `ImageViewDataset` makes them)."""
    image = open_image(cell)
    boxes = augmentation.draw_crops(image.height, image.width, seed)
    data = read_bytes(cell) if baseline_jpeg(image) else None
    if data is not None:
        return {"jpeg": data, "boxes": boxes_tensor(boxes)}
    view1, view2 = decode_crops(cell, image, boxes, size)
    return {"view1": view1, "view2": view2}


def collate_jpegs(examples: list[dict]) -> dict:
    """The device path's part of a batch: `jpeg` (the files' bytes: not tensors, so that the loader leaves
    them on the host), `jpeg_boxes` (n, 2, 5), the host
    crops `host_view1`/`host_view2` of the other rows, and where each kind sits (`jpeg_rows`,
    `host_rows`)."""
    jpeg_rows = [i for i, e in enumerate(examples) if "jpeg" in e]
    host_rows = [i for i, e in enumerate(examples) if "jpeg" not in e]
    batch: dict = {"jpeg_rows": torch.tensor(jpeg_rows, dtype=torch.long)}
    batch["host_rows"] = torch.tensor(host_rows, dtype=torch.long)
    batch["jpeg"] = [examples[i]["jpeg"] for i in jpeg_rows]
    batch["jpeg_boxes"] = (
        torch.stack([examples[i]["boxes"] for i in jpeg_rows])
        if jpeg_rows
        else torch.zeros(0, 2, 5, dtype=torch.long)
    )
    for key in ("view1", "view2"):
        if host_rows:
            batch["host_" + key] = torch.stack([examples[i][key] for i in host_rows])
    return batch


def padded_chunks(regions: list[torch.Tensor]):
    """Consecutive runs of (3, h_i, w_i) regions, each zero-padded into one (n, 3, H, W) tensor of at most
    `MAX_CHUNK_PIXELS` pixels (a single larger region gets its own): yields (start, stop, padded)."""
    start = 0
    while start < len(regions):
        height = width = 0
        stop = start
        while stop < len(regions):
            h, w = max(height, regions[stop].shape[-2]), max(width, regions[stop].shape[-1])
            if stop > start and (stop - start + 1) * h * w > MAX_CHUNK_PIXELS:
                break
            height, width, stop = h, w, stop + 1
        padded = regions[start].new_zeros(stop - start, 3, height, width)
        for i in range(start, stop):
            padded[i - start, :, : regions[i].shape[-2], : regions[i].shape[-1]] = regions[i]
        yield start, stop, padded
        start = stop


def crop_decoded(
    images: list[torch.Tensor], boxes: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of decoded (3, h_i, w_i) uint8 images of different sizes, each view cut to its box
    (`boxes`: (n, 2, 5) as `boxes_tensor`) and resized to `size` by `batched_resized_crop` on the images'
    device: each view's box regions are cut first (on average about half an image), then zero-padded to a
    common size in chunks and resampled from their corner (the weights never reach the padding)."""
    device = images[0].device
    views = torch.empty(2, len(images), 3, size, size, dtype=torch.uint8, device=device)
    spec = boxes.tolist()  # host integers: no device synchronisation per box
    for v in range(2):
        regions = [
            image[:, top : top + h, left : left + w]
            for image, (top, left, h, w, _) in zip(images, (b[v] for b in spec), strict=True)
        ]
        flips = torch.tensor([b[v][4] for b in spec], dtype=torch.bool, device=device)
        for start, stop, padded in padded_chunks(regions):
            h = torch.tensor([r.shape[-2] for r in regions[start:stop]], device=device)
            w = torch.tensor([r.shape[-1] for r in regions[start:stop]], device=device)
            corner = torch.zeros_like(h)
            views[v, start:stop] = batched_resized_crop(padded, corner, corner, h, w, flips[start:stop], size)
    return views[0], views[1]


def decode_views(batch: dict, size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both uint8 views of a `collate_jpegs` batch on `device`: its JPEGs decoded there in one call, cropped
    there, and its host crops moved there, in the batch's row order. Raises `DataError` naming the failing
    row when a JPEG cannot be decoded."""
    device = torch.device(device)
    n = len(batch["jpeg_rows"]) + len(batch["host_rows"])
    out = [torch.empty(n, 3, size, size, dtype=torch.uint8, device=device) for _ in range(2)]
    if batch["jpeg"]:
        try:
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch["jpeg"]]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as error:
            raise DataError(f"a JPEG of the batch could not be decoded on {device.type}: {error}") from error
        views = crop_decoded(images, batch["jpeg_boxes"], size)
        rows = batch["jpeg_rows"].to(device)
        for v in range(2):
            out[v][rows] = views[v]
    if len(batch["host_rows"]):
        rows = batch["host_rows"].to(device)
        for v, key in enumerate(("host_view1", "host_view2")):
            out[v][rows] = batch[key].to(device, non_blocking=True)
    return out[0], out[1]


def batch_crops(batch: dict, size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 crops of a training batch: its `view1`, `view2`, or for a `--decode_on_device` batch
    (`collate_jpegs`) the views `decode_views` makes on `device`."""
    if "jpeg_rows" in batch:
        return decode_views(batch, size, device)
    return batch["view1"], batch["view2"]
