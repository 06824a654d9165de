"""Finding and reading images robustly: a bad file becomes an error record, never a crash.

Reading follows torchvision's ``pil_loader`` (decode, then convert to RGB before any resizing), which is how
the fine-tuned encoders saw their data. Modes other than RGB and L are converted with a warning:

- alpha (RGBA, LA, PA, palette transparency) is dropped, as PIL's ``convert("RGB")``, torchvision's loader
  and open_clip do, so the pixels are those the torch reference pipeline sees;
- 16-bit and 32-bit greyscale is mapped to 8 bits by one fixed rule, never by the image's own range (a
  near-black image stays near black): I;16* and I (how Pillow decodes 16-bit PNG/TIFF) divide by 257, so
  0..65535 -> 0..255 (I values outside 0..65535 clip); F (float) is taken as 0..1 and multiplied by 255 (clipped);
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

# Decoded pixels allowed per image (width x height): a small file can decode to gigabytes (a "decompression
# bomb"). Such a file is an error row; the run goes on. `run --max-megapixels` raises it.
DEFAULT_MAX_PIXELS = 64_000_000
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
    """The fixed 16/32-bit -> 8-bit mapping of the module docstring (65535 -> 255 for integers, 1.0 -> 255 for F)."""
    pixels = np.asarray(image).astype(np.float64)
    scaled = pixels * 255.0 if image.mode == "F" else pixels / 257.0
    return Image.fromarray(np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8), "L")


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


def too_many_pixels(size: tuple[int, int], max_pixels: int) -> str | None:
    width, height = size
    if width * height > max_pixels:
        return (f"refused: {width}x{height} = {width * height / 1e6:.1f} megapixels decoded exceeds the limit of "
                f"{max_pixels / 1e6:g} (--max-megapixels)")
    return None


def unreadable(item) -> str | None:
    """Why a path (or PathProblem) cannot be an image file, found without opening it; None: go on and decode.
    The one check before reading, wherever the file is then read (here, or by Ray on a worker)."""
    if isinstance(item, PathProblem):
        return item.error
    path = Path(item)
    try:
        if path.is_dir():
            return "is a directory"
        if not path.exists():
            return "no such file"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        if not os.access(path, os.R_OK):
            return "permission denied"
    except OSError as error:
        return f"cannot read ({error.strerror or error})"
    return None


def load_image(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode a file fully (truncation surfaces here) and convert it to RGB; problems become ``error``.

    The size is checked from the header before decoding: more than ``max_pixels`` is an error, not a decode."""
    if problem := unreadable(path):
        return LoadedImage(None, problem)
    return _decode(lambda: Image.open(path), max_pixels)


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """As :func:`load_image`, for an encoded image held in memory (e.g. a Ray Data ``bytes`` column)."""
    if not data:
        return LoadedImage(None, "empty file (0 bytes)")
    return _decode(lambda: Image.open(io.BytesIO(bytes(data))), max_pixels)


def _decode(open_image, max_pixels: int) -> LoadedImage:
    try:
        with open_image() as image:
            if problem := too_many_pixels(image.size, max_pixels):
                return LoadedImage(None, problem)
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


def as_image(item, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """A path, encoded bytes, PIL image or HWC uint8 array as an RGB PIL image (arrays: (H, W), (H, W, 3) or
    (H, W, 4))."""
    if isinstance(item, (str, os.PathLike)):  # PathProblem included
        return load_image(item, max_pixels)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image_bytes(item, max_pixels)
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
