"""Finding and reading images robustly: a bad file becomes an error record, never a crash.

Reading follows torchvision's ``pil_loader`` (decode, then convert to RGB before any resizing), which is how
the fine-tuned encoders saw their data. Modes other than RGB and L are converted with a warning:

- alpha (RGBA, LA, PA, palette transparency) is dropped, as PIL's ``convert("RGB")``, torchvision's loader
  and open_clip do, so the pixels are those the torch reference pipeline sees;
- 16-bit and 32-bit greyscale (I;16*, I, F) is scaled to 8 bits (PIL's own conversion would clip at 255);
- CMYK, palette, 1-bit and others use PIL's conversion.

EXIF orientation is not applied (torchvision and open_clip do not apply it either).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class LoadedImage:
    image: Image.Image | None  # RGB, or None when the file could not be read
    error: str | None = None
    warning: str | None = None


@dataclass(frozen=True)
class PathProblem:
    """A PATH argument that names no image: a missing path or a folder without images."""

    path: Path
    error: str

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def expand_paths(paths) -> list[Path | PathProblem]:
    """Image files named by PATH arguments, in argument order: files as given, folders searched recursively
    (sorted, by extension). Hidden files and folders are skipped (macOS ``._x.jpg`` files are not images).
    Missing paths and folders without images become PathProblem entries, which classify reports as errors.
    """
    out: list[Path | PathProblem] = []
    for arg in map(Path, paths):
        if arg.is_dir():
            found = []
            for root, dirs, names in os.walk(arg):  # does not follow symlinked folders: no loops
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root, n) for n in names
                          if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
            out += sorted(found, key=lambda p: p.as_posix()) or [
                PathProblem(arg, f"no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder")]
        elif arg.exists():
            out.append(arg)
        else:
            out.append(PathProblem(arg, "no such file or directory"))
    return out


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image).astype(np.float64)
    top = float(pixels.max()) if pixels.size else 0.0
    if image.mode == "F" and top <= 1.0:
        pixels = pixels * 255.0
    elif top > 255:
        pixels = pixels / (65535.0 if top <= 65535 else top) * 255.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The RGB image and a warning describing any lossy conversion (None for RGB and greyscale L)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "L":
        return image.convert("RGB"), None
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(image).convert("RGB"), f"{mode} image scaled to 8-bit greyscale"
    if mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB"), "palette image with transparency: converted to RGB, alpha dropped"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image.convert("RGB"), f"{mode} image: alpha channel dropped"
    return image.convert("RGB"), f"{mode} image converted to RGB"


def load_image(path) -> LoadedImage:
    """Decode a file fully (truncation surfaces here) and convert it to RGB; problems become ``error``."""
    path = Path(path)
    try:
        if path.is_dir():
            return LoadedImage(None, "is a directory")
        if path.exists() and path.stat().st_size == 0:
            return LoadedImage(None, "empty file (0 bytes)")
    except OSError as error:
        return LoadedImage(None, f"cannot read ({error.strerror or error})")
    return _decode(lambda: Image.open(path))


def decode_image_bytes(data: bytes) -> LoadedImage:
    """As :func:`load_image`, for an encoded image held in memory (e.g. a Ray Data ``bytes`` column)."""
    if not data:
        return LoadedImage(None, "empty file (0 bytes)")
    return _decode(lambda: Image.open(io.BytesIO(bytes(data))))


def _decode(open_image) -> LoadedImage:
    try:
        with open_image() as image:
            image.load()
            rgb, warning = to_rgb(image)
            rgb.load()
        return LoadedImage(rgb, None, warning)
    except FileNotFoundError:
        return LoadedImage(None, "no such file")
    except PermissionError:
        return LoadedImage(None, "permission denied")
    except UnidentifiedImageError:
        return LoadedImage(None, "not an image (format not recognised)")
    except Image.DecompressionBombError as error:
        return LoadedImage(None, f"refused: {error}")
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated ..."), sometimes others.
        return LoadedImage(None, f"corrupt or truncated image ({type(error).__name__}: {error})")


def as_image(item) -> LoadedImage:
    """A path, encoded bytes, PIL image or HWC uint8 array as an RGB PIL image (arrays: (H, W), (H, W, 3) or (H, W, 4))."""
    if isinstance(item, PathProblem):
        return LoadedImage(None, item.error)
    if isinstance(item, (str, os.PathLike)):
        return load_image(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image_bytes(item)
    if isinstance(item, Image.Image):
        rgb, warning = to_rgb(item)
        return LoadedImage(rgb, None, warning)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4))):
            raise ValueError(f"arrays must be HWC uint8 with 1, 3 or 4 channels; got {item.dtype} {item.shape}")
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]
        rgb, warning = to_rgb(Image.fromarray(np.ascontiguousarray(item)))
        return LoadedImage(rgb, None, warning)
    raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(item).__name__}")


SAMPLE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "brick", "grass")


def sample_photos() -> list[Image.Image]:
    """Real photos bundled with scikit-image (colour and greyscale, various sizes): the default images of
    validation and benchmarks. scikit-image is a build-side dependency, imported only here."""
    from skimage import data

    return [Image.fromarray(getattr(data, name)()) for name in SAMPLE_PHOTOS]
