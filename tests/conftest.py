"""Shared fixtures: offline, two CPU threads, tiny models and a few hundred real Fashion-MNIST images."""

import os

# Set before transformers/datasets/timm are imported anywhere: the suite never touches the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import load_dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_corinfomax import CorInfoMaxConfig, CorInfoMaxForPreTraining  # noqa: E402

torch.set_num_threads(2)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

REPO_ROOT = Path(__file__).resolve().parents[1]
from modeling_corinfomax.data import BUNDLED_DATA_DIR  # noqa: E402

FASHION_MNIST = BUNDLED_DATA_DIR
IMAGE_SIZE = 32


def tiny_config_kwargs(**overrides) -> dict:
    """Keyword arguments of the tiny model the modeling tests use (resnet10t, CIFAR stem, 32 px)."""
    kwargs = dict(backbone="resnet10t", cifar_stem=True, projector_dims=[64, 64, 16], image_size=IMAGE_SIZE)
    return {**kwargs, **overrides}


@pytest.fixture
def make_config():
    """Factory of tiny configs: `make_config(backbone="resnet18", cifar_stem=False, ...)`."""
    return lambda **overrides: CorInfoMaxConfig(**tiny_config_kwargs(**overrides))


@pytest.fixture
def tiny_config(make_config) -> CorInfoMaxConfig:
    """A fresh tiny config (tests may mutate it)."""
    return make_config()


def image_transform(config: CorInfoMaxConfig) -> v2.Compose:
    """L-mode 28x28 Fashion-MNIST image -> normalised (3, image_size, image_size) float tensor."""
    return v2.Compose(
        [
            v2.Lambda(lambda image: image.convert("RGB")),
            v2.PILToTensor(),
            v2.Resize(config.image_size, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(config.image_mean, config.image_std),
        ]
    )


@pytest.fixture(scope="session")
def fashion_transform():
    """`fashion_transform(config)`: the PIL -> tensor transform the tests train with."""
    return image_transform


@pytest.fixture(scope="session")
def fashion_mnist(tmp_path_factory):
    """The bundled Fashion-MNIST subset, loaded the way users load it: 200 train and 100 test images
    (class-balanced source, shuffled with a fixed seed), columns `image` (PIL, L, 28x28) and `label`."""
    data = load_dataset(
        "parquet",
        data_files={split: str(FASHION_MNIST / f"{split}.parquet") for split in ("train", "test")},
        cache_dir=str(tmp_path_factory.mktemp("datasets_cache")),
    )
    return {
        "train": data["train"].shuffle(seed=0).select(range(200)),
        "test": data["test"].shuffle(seed=0).select(range(100)),
    }


@pytest.fixture(scope="session")
def fashion_uint8() -> torch.Tensor:
    """128 real Fashion-MNIST test images as (128, 3, 28, 28) uint8 (grey: three equal channels)."""
    from datasets import Dataset  # noqa: PLC0415
    from torchvision.transforms.v2 import functional as TF  # noqa: PLC0415

    rows = Dataset.from_parquet(str(FASHION_MNIST / "test.parquet")).select(range(128))
    return torch.stack([TF.pil_to_tensor(row["image"].convert("RGB")) for row in rows])


@pytest.fixture(scope="session")
def fashion_pixels(fashion_mnist):
    """`(pixel_values (200, 3, 32, 32), labels (200,))` of the train subset, normalised as the tiny config."""
    transform = image_transform(CorInfoMaxConfig(**tiny_config_kwargs()))
    train = fashion_mnist["train"]
    pixels = torch.stack([transform(image) for image in train["image"]])
    return pixels, torch.tensor(train["label"])


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, fashion_pixels):
    """A tiny `CorInfoMaxForPreTraining` after 3 steps on real images (so BN statistics and the loss state
    are not at their initial values), saved with `save_pretrained`. Returns `(model in eval mode, path)`.
    Tests must not modify the model (deep-copy it first)."""
    torch.manual_seed(0)
    model = CorInfoMaxForPreTraining(CorInfoMaxConfig(**tiny_config_kwargs()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pixels, _ = fashion_pixels
    for step in range(3):
        batch = pixels[8 * step : 8 * (step + 1)]
        # Two cheap "views": a flip and a small shift, enough for a non-trivial update.
        out = model(pixel_values=batch, pixel_values_2=torch.roll(batch.flip(-1), 2, dims=-1))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "corinfomax-tiny"
    model.save_pretrained(path)
    return model, path
