"""Data for CorInfoMax, one module per pipeline stage: `datasets` loading and columns (`sources`),
decoding to RGB (`decoding`; on the training device: `device_decode`), crop geometry (`geometry`), the training resolution from the images' sizes
(`resolution`), colour operations (`colour`), the paper's
two-view augmentation (`augmentation`), the PyTorch datasets, collator and sampler (`datasets`) and
the labelled splits the evaluations use (`splits`).

The pipeline is split so that the expensive part runs batched:
- decode and crop: either per image in DataLoader workers (both crop boxes drawn from the header, a JPEG
  decoded at reduced scale where both boxes allow it, random-resized-crop + flip twice, as uint8 tensors:
  `ImageViewDataset`; with `--decode_on_device` the workers pass the JPEG bytes and boxes and the training
  device decodes and crops the batch), or, for a split of same-size images that fits in
  memory, decoded once into one uint8 tensor and cropped a whole batch at a time with the same
  antialiased bicubic resampling (`decode_split`, `InMemoryTwoViewDataset`): no per-image work during
  training;
- in the training step, per batch, on the training device: colour jitter, grayscale, Gaussian blur,
  solarisation and normalisation with per-sample random parameters (`BatchViewAugment`).

Every random draw is a function of `(seed, epoch, sample index)`, `(seed, epoch, batch)` or
`(seed, step, rank)`, so an interrupted and resumed run sees exactly the same views.
"""

from ..errors import DataError
from .augmentation import (
    BatchViewAugment,
    TwoViewAugmentation,
    ViewAugmentation,
    derive_seed,
    normalize_batch,
)
from .colour import grayscale, hsv_to_rgb, rgb_to_hsv
from .datasets import (
    DecodedSplit,
    EpochShuffleSampler,
    ExampleCollator,
    ImageViewDataset,
    InMemoryEvalDataset,
    InMemoryTwoViewDataset,
    IterableImageViewDataset,
    NormalizedBatches,
    decode_split,
    split_stream,
)
from .decoding import decode_crops, decode_image, decode_image_tensor, open_image, reduction_for, to_rgb
from .device_decode import batch_crops, decode_views
from .geometry import (
    CROP_RATIO,
    CropBox,
    apply_crop,
    batched_resized_crop,
    centre_crop_box,
    crop_view,
    draw_crop,
    eval_view,
    random_resized_crop_params,
    resize_weights,
    sample_crop_boxes,
)
from .resolution import (
    PHOTO_RESOLUTION,
    ResolutionChoice,
    choose_resolution,
    min_resolution,
    resolution_for,
)
from .sources import (
    BUNDLED_DATA_DIR,
    FASHION_MNIST_DIR,
    class_indices,
    class_names,
    label_names,
    load_image_dataset,
    read_idx,
    resolve_columns,
    undecoded_columns,
)
from .splits import labelled_rows, load_evaluation_splits, load_labelled_splits

__all__ = [
    "labelled_rows",
    "load_evaluation_splits",
    "load_labelled_splits",
    "BUNDLED_DATA_DIR",
    "CROP_RATIO",
    "BatchViewAugment",
    "DataError",
    "FASHION_MNIST_DIR",
    "DecodedSplit",
    "EpochShuffleSampler",
    "ExampleCollator",
    "NormalizedBatches",
    "PHOTO_RESOLUTION",
    "ResolutionChoice",
    "ImageViewDataset",
    "InMemoryEvalDataset",
    "InMemoryTwoViewDataset",
    "IterableImageViewDataset",
    "TwoViewAugmentation",
    "ViewAugmentation",
    "batched_resized_crop",
    "centre_crop_box",
    "choose_resolution",
    "class_indices",
    "class_names",
    "crop_view",
    "CropBox",
    "apply_crop",
    "batch_crops",
    "decode_crops",
    "reduction_for",
    "decode_views",
    "draw_crop",
    "open_image",
    "decode_image",
    "decode_image_tensor",
    "decode_split",
    "derive_seed",
    "eval_view",
    "grayscale",
    "hsv_to_rgb",
    "label_names",
    "load_image_dataset",
    "min_resolution",
    "read_idx",
    "normalize_batch",
    "random_resized_crop_params",
    "resize_weights",
    "resolution_for",
    "resolve_columns",
    "rgb_to_hsv",
    "sample_crop_boxes",
    "split_stream",
    "to_rgb",
    "undecoded_columns",
]
