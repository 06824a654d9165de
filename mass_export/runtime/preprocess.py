"""open_clip's eval transform (``image_transform(..., is_train=False)``) in PIL + numpy.

Every step copies torchvision's arithmetic (output size rounding, ``round`` in the centre crop, float32
``/ 255`` then ``(x - mean) / std``), so the result equals open_clip's tensor bit for bit; tests check it on
real photos. Resizing happens in the image's own mode and conversion to RGB after the crop, as open_clip does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from mass_export.core.errors import ConfigError

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "random": Image.Resampling.BICUBIC}  # open_clip evaluates "random" as bicubic


def _resize(image: Image.Image, height: int, width: int, resample) -> Image.Image:
    if image.size == (width, height):
        return image  # torchvision returns the image untouched when the size already matches
    return image.resize((width, height), resample)


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes ``size``, the long side is truncated, not rounded."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _center_crop_or_pad(image: Image.Image, height: int, width: int, fill: int) -> Image.Image:
    if width > image.width or height > image.height:
        pad_w, pad_h = max(width - image.width, 0), max(height - image.height, 0)
        image = ImageOps.expand(image, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2),
                                fill=fill)
        if image.size == (width, height):
            return image
    top = int(round((image.height - height) / 2.0))  # Python's round: half to even, as torchvision
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class Preprocessor:
    """PIL image -> (3, H, W) float32, exactly as open_clip's eval transform for the same parameters."""

    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self):
        size = self.image_size
        size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "mean", tuple(float(m) for m in np.broadcast_to(self.mean, 3)))
        object.__setattr__(self, "std", tuple(float(s) for s in np.broadcast_to(self.std, 3)))
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(f"interpolation {self.interpolation!r}: expected one of {sorted(_RESAMPLE)}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ConfigError(f"resize_mode {self.resize_mode!r}: expected shortest, longest or squash")

    @classmethod
    def from_manifest(cls, model: dict) -> "Preprocessor":
        """From ``manifest["model"]``; missing fields take open_clip's defaults."""
        from_openai = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
        return cls(model["image_size"], tuple(model.get("mean") or from_openai[0]),
                   tuple(model.get("std") or from_openai[1]), model.get("interpolation") or "bicubic",
                   model.get("resize_mode") or "shortest", int(model.get("fill_color", 0)))

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        height, width = self.image_size
        resample = _RESAMPLE[self.interpolation]
        if self.resize_mode == "squash":
            return _resize(image, height, width, resample)
        if self.resize_mode == "shortest" and height == width:
            image = _resize(image, *_shortest_edge_size(image.height, image.width, height), resample)
            return _center_crop_or_pad(image, height, width, 0)
        # open_clip's ResizeKeepRatio: scale by the short (or long) side ratio, rounded; bicubic by default.
        longest = 1.0 if self.resize_mode == "longest" else 0.0
        ratios = (image.height / height, image.width / width)
        ratio = max(ratios) * longest + min(ratios) * (1.0 - longest)
        if self.resize_mode == "shortest":
            resample = Image.Resampling.BICUBIC  # open_clip builds this ResizeKeepRatio without interpolation
        image = _resize(image, round(image.height / ratio), round(image.width / ratio), resample)
        return _center_crop_or_pad(image, height, width, self.fill_color if longest else 0)

    def __call__(self, image: Image.Image) -> np.ndarray:
        rgb = self.resize_and_crop(image).convert("RGB")
        pixels = np.asarray(rgb, dtype=np.uint8).astype(np.float32) / np.float32(255)
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def batch(self, images) -> np.ndarray:
        """(B, 3, H, W) float32."""
        return np.stack([self(image) for image in images]) if images else np.zeros((0, 3, *self.image_size),
                                                                                   np.float32)
