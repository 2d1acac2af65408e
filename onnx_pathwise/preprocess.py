"""Image preprocessing presets: from an image file to the model's input tensor.

A :class:`Preprocessing` is frozen and fully resolved against the model (its input size,
channel count and layout), so the same object both runs the pipeline and describes it:
:meth:`Preprocessing.to_json` is recorded in every output.

The pipeline, in this order (the reference that the tests re-implement with Pillow and numpy):

1. decode with Pillow (PNG, JPEG, BMP, TIFF, WebP, ...), honouring the EXIF orientation
   (:func:`PIL.ImageOps.exif_transpose`);
2. convert to the model's channel count: ``L`` for 1 channel, ``RGB`` for 3, ``RGBA`` for 4
   (greyscale, palette and RGBA files all work);
3. resize the shorter side to ``resize`` pixels with Pillow's bilinear filter, the long side to
   ``int(resize * long / short)`` — torchvision's ``Resize(int)`` on PIL images;
4. centre-crop to ``crop`` (top/left offsets ``int(round((size - crop) / 2))``, torchvision's
   ``CenterCrop``);
5. arithmetic in float32: ``x / divide + offset``, then ``(x - mean) / std`` per channel;
6. channel order (``bgr`` reverses RGB) and layout (``nchw``: C×H×W, ``nhwc``: H×W×C).

Presets (:data:`PRESETS`):

========  ==============================================================================
imagenet  resize 256, crop 224 (scaled to the model's size), x/255, mean (0.485, 0.456, 0.406),
          std (0.229, 0.224, 0.225) — torchvision's ImageNet convention
caffe     BGR, 0–255, mean subtraction (103.939, 116.779, 123.68) in BGR order — Keras ``caffe``
tf        x/127.5 − 1, in [-1, 1] — Keras ``tf``
unit      x/255, in [0, 1]
none      pixel values 0–255 as float32
========  ==============================================================================

Every preset fits the geometry to the model: the crop is the model's input size, and the
shorter side is resized to the crop's larger side (``imagenet``: to 256/224 of it). Three
per-channel mean/std values become their average for a greyscale model; an RGBA model's alpha
channel gets mean 0, std 1.

>>> p = preset("imagenet").resolve((3, 224, 224))
>>> p.resize, p.crop, p.layout
(256, (224, 224), 'nchw')
>>> preset("caffe").resolve((32, 32, 3)).to_json()["channel_order"]
'bgr'
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, PathwiseError
from .io import open_regular

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
LAYOUTS = ("nchw", "nhwc")
#: What each preset does: (divide, offset, mean, std, channel order).
PRESETS: dict[str, tuple[float, float, tuple[float, ...] | None, tuple[float, ...] | None, str]] = {
    "imagenet": (255.0, 0.0, IMAGENET_MEAN, IMAGENET_STD, "rgb"),
    "caffe": (1.0, 0.0, CAFFE_MEAN_BGR, None, "bgr"),
    "tf": (127.5, -1.0, None, None, "rgb"),
    "unit": (255.0, 0.0, None, None, "rgb"),
    "none": (1.0, 0.0, None, None, "rgb"),
}
#: Errors Pillow raises on a file that is not a (complete) image.
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, ValueError, EOFError, IndexError,
                                                  TypeError, KeyError, ZeroDivisionError)


@dataclass(frozen=True)
class Preprocessing:
    """One image pipeline (see the module docstring); build it with :func:`preset`.

    ``resize`` (shorter side), ``crop`` (h, w), ``channels``, ``layout`` are ``None`` until
    :meth:`resolve` fits them to a model input shape.
    """

    name: str = "imagenet"
    resize: int | None = None
    crop: tuple[int, int] | None = None
    divide: float = 255.0
    offset: float = 0.0
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    channel_order: str = "rgb"
    layout: str | None = None
    channels: int | None = None
    interpolation: str = "bilinear"

    # ------------------------------------------------------------------ model fit

    def resolve(self, input_shape: Sequence[int]) -> Preprocessing:
        """Fit to a per-sample model input shape: (C, H, W), (H, W, C) or (H, W).

        The layout is read from where the 1, 3 or 4 channels are (``nchw`` when ambiguous)
        unless set; the crop is the model's spatial size (an explicit crop must equal it).
        """
        shape = tuple(int(d) for d in input_shape)
        layout = self.layout
        if len(shape) == 2:
            layout, channels, size = "hw", 1, shape
        elif len(shape) == 3:
            if layout is None:
                layout = "nchw" if shape[0] in (1, 3, 4) or shape[2] not in (1, 3, 4) else "nhwc"
            channels = shape[0] if layout == "nchw" else shape[2]
            size = shape[1:] if layout == "nchw" else shape[:2]
            if channels not in (1, 3, 4):
                raise InputError(f"model input {shape} ({layout}) has {channels} channels; images give 1, 3 or 4 "
                                 "(choose the layout with --layout nchw|nhwc)")
        else:
            raise InputError(f"model input {shape} is not an image (C×H×W, H×W×C or H×W); "
                             "give a .npy/.npz array or a CSV/Parquet table instead")
        crop = (int(size[0]), int(size[1]))
        if self.crop is not None and tuple(self.crop) != crop:
            raise PathwiseError(f"--crop {self.crop[0]}x{self.crop[1]} does not match the model's input size "
                                f"{crop[0]}x{crop[1]}")
        resize = self.resize
        if resize is None:
            resize = round(max(crop) * 256 / 224) if self.name == "imagenet" else max(crop)
        if resize < min(crop):
            raise PathwiseError(f"--resize {resize} is smaller than the crop {crop[0]}x{crop[1]}")
        mean, std = _fit_channels(self.mean, channels, 0.0), _fit_channels(self.std, channels, 1.0)
        for what, values in (("--mean", mean), ("--std", std)):
            if values is not None and len(values) not in (1, channels):
                raise PathwiseError(f"{what} has {len(values)} values; the model takes {channels} channel(s)")
        if std is not None and any(s == 0 for s in std):
            raise PathwiseError("--std: values must be non-zero")
        return dataclasses.replace(self, resize=int(resize), crop=crop, layout=layout, channels=channels,
                                   mean=mean, std=std)

    @property
    def resolved(self) -> bool:
        return self.channels is not None

    def to_json(self) -> dict[str, Any]:
        """What was done, as recorded in every output."""
        return {"preset": self.name, "resize_shorter_side": self.resize,
                "crop": list(self.crop) if self.crop else None, "interpolation": self.interpolation,
                "divide": self.divide, "offset": self.offset,
                "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None,
                "channel_order": self.channel_order, "layout": self.layout, "channels": self.channels,
                "exif_orientation": True}

    # ------------------------------------------------------------------ the pipeline

    def load(self, path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
        """Read an image file: (model input float32 in the model's layout, original H×W×3 uint8 RGB).

        The original is the image after orientation, resize and crop (so it lines up with the
        model input pixel for pixel), before any arithmetic. A missing, corrupt or truncated
        file, or one that is not an image, is an :class:`InputError` naming it.
        """
        from PIL import Image, ImageOps, UnidentifiedImageError

        try:
            f, _ = open_regular(path, InputError, "an image file")
            with f, Image.open(f) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                return self.apply(image)
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except UnidentifiedImageError:
            raise InputError(f"{path}: not an image Pillow can read") from None
        except Image.DecompressionBombError as exc:
            raise InputError(f"{path}: image too large ({exc})") from None
        except _IMAGE_ERRORS as exc:
            raise InputError(f"{path}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None

    def apply(self, image: Any) -> tuple[np.ndarray, np.ndarray]:
        """Run steps 2–6 on an opened PIL image (see :meth:`load`)."""
        from PIL import Image

        if not self.resolved:
            raise ValueError("Preprocessing.apply needs a resolved pipeline (call .resolve(input_shape))")
        assert self.crop is not None and self.resize is not None
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[int(self.channels or 3)]
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
            values = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if values.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8))
        if image.mode != mode:
            image = image.convert(mode)
        image = resize_shorter(image, self.resize)
        image = center_crop(image, self.crop)
        original = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return self.normalise(np.asarray(image, dtype=np.uint8)), original

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Steps 5–6 on H×W×C (or H×W) uint8 pixels in RGB(A) order."""
        x: np.ndarray = pixels.astype(np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.channel_order == "bgr" and x.shape[2] >= 3:
            x = np.concatenate([x[:, :, 2::-1], x[:, :, 3:]], axis=2)
        x = x / np.float32(self.divide)
        if self.offset:
            x = x + np.float32(self.offset)
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32)
        if self.std is not None:
            x = x / np.asarray(self.std, np.float32)
        if self.layout == "nchw":
            x = x.transpose(2, 0, 1)
        elif self.layout == "hw":
            x = x[:, :, 0]
        return np.ascontiguousarray(x, dtype=np.float32)


def _fit_channels(values: tuple[float, ...] | None, channels: int, alpha: float) -> tuple[float, ...] | None:
    """Three per-channel values for a greyscale model become their mean; an RGBA model gets
    ``alpha`` (0 for the mean, 1 for the std) for its alpha channel."""
    if values is None or len(values) != 3 or channels == 3:
        return values
    if channels == 1:
        return (float(np.mean(values)),)
    return values + (alpha,) if channels == 4 else values


def resize_shorter(image: Any, size: int) -> Any:
    """Resize so the shorter side is ``size`` (bilinear), as torchvision's ``Resize(size)`` on PIL."""
    from PIL import Image

    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(image: Any, crop: tuple[int, int]) -> Any:
    """torchvision's ``CenterCrop``: offsets ``int(round((size - crop) / 2))``."""
    w, h = image.size
    ch, cw = crop
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    if (top, left, ch, cw) == (0, 0, h, w):
        return image
    return image.crop((left, top, left + cw, top + ch))


def _floats(option: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise PathwiseError(f"{option} {text!r}: expected numbers separated by commas, e.g. 0.5,0.5,0.5") from None
    if not values:
        raise PathwiseError(f"{option}: no values given")
    return values


def _size(option: str, text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise PathwiseError(f"{option} {text!r}: expected a size like 224 or 224x224") from None
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise PathwiseError(f"{option} {text!r}: expected a size like 224 or 224x224")
    return (sizes[0], sizes[-1])


def preset(name: str = "imagenet", *, resize: int | str | None = None, crop: str | tuple[int, int] | None = None,
           mean: str | Sequence[float] | None = None, std: str | Sequence[float] | None = None,
           layout: str | None = None) -> Preprocessing:
    """A preset with the command line's overrides (``--resize``, ``--crop``, ``--mean``,
    ``--std``, ``--layout``); strings are parsed as the options are, and bad values raise
    :class:`PathwiseError` naming the option."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise PathwiseError(f"--preprocess {name!r}: choose one of {', '.join(PRESETS)}")
    divide, offset, p_mean, p_std, order = PRESETS[key]
    if layout is not None and layout.lower() not in LAYOUTS:
        raise PathwiseError(f"--layout {layout!r}: choose nchw or nhwc")
    if isinstance(resize, str):
        size = _size("--resize", resize)
        assert size is not None
        resize = size[0]
    if resize is not None and int(resize) < 1:
        raise PathwiseError(f"--resize {resize}: must be a positive size")
    crop_size = _size("--crop", crop) if isinstance(crop, str) else crop
    mean_v = _floats("--mean", mean) if isinstance(mean, str) else (tuple(mean) if mean is not None else None)
    std_v = _floats("--std", std) if isinstance(std, str) else (tuple(std) if std is not None else None)
    return Preprocessing(
        name=key, resize=int(resize) if resize is not None else None,
        crop=tuple(crop_size) if crop_size is not None else None,  # type: ignore[arg-type]
        divide=divide, offset=offset,
        mean=mean_v if mean_v is not None else p_mean, std=std_v if std_v is not None else p_std,
        channel_order=order, layout=layout.lower() if layout else None,
    )
