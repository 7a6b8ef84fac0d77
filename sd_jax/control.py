"""Control images for ControlNets: reading and resizing them as diffusers does, canny edges,
the CLI's ``KIND:IMAGE[:SCALE]`` and the per-step on/off table of a guidance window.

Preprocessing that needs a model (pose, depth, normal estimation) is not done here: such
control images are given as files (any ``KIND`` other than ``canny`` is used as it is).
"""
from __future__ import annotations

import os

import numpy as np

from sd_jax.request import RequestError

CANNY_THRESHOLDS = (100, 200)   # the low/high thresholds of diffusers' and the ControlNet paper's examples
KINDS = ("canny", "image", "pose", "depth", "normal", "scribble", "tile", "seg", "lineart", "softedge", "mlsd")


def load_control_image(image, height: int, width: int) -> np.ndarray:
    """A path, PIL image or HxW(xC) array -> float32 [height, width, 3] in [0, 1].

    As diffusers' ``control_image_processor`` (``VaeImageProcessor(do_convert_rgb=True,
    do_normalize=False)``): converted to RGB and resized to the output size with Lanczos
    resampling.  Arrays are uint8 in [0, 255] or floats in [0, 1]; one of another size is
    resized the same way (as uint8)."""
    from PIL import Image
    what = image if isinstance(image, (str, os.PathLike)) else type(image).__name__
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as e:
            raise RequestError(f"control image {str(what)!r} is not a readable image ({e})") from None
    if isinstance(image, np.ndarray) or hasattr(image, "__array__") and not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4) or not np.issubdtype(arr.dtype, np.number):
            raise RequestError(f"a control image array must be HxW, HxWx1, HxWx3 or HxWx4 numbers, "
                               f"got shape {arr.shape} ({arr.dtype})")
        arr = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 or arr.max() > 1.0 else 1.0)
        arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
        if arr.shape[:2] == (height, width):
            return np.ascontiguousarray(arr)
        image = Image.fromarray(np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8))
    if not isinstance(image, Image.Image):
        raise RequestError(f"a control image must be an image file, a PIL image or an HxWx3 array, got {what}")
    image = image.convert("RGB").resize((width, height), Image.LANCZOS)
    return np.asarray(image, np.float32) / 255.0


def canny(image, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]):
    """Canny edges of an image (path, PIL image or uint8 array) as a 3-channel PIL image, as in
    diffusers' ControlNet examples (``cv2.Canny(np.array(image), low, high)``, repeated on RGB).
    Needs ``opencv-python-headless`` (``pip install 'sd-jax[canny]'``)."""
    from PIL import Image
    try:
        import cv2
    except ImportError:
        raise RequestError("canny control images need OpenCV: pip install 'sd-jax[canny]' "
                           "(opencv-python-headless)") from None
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image).convert("RGB")
        except (OSError, ValueError) as e:
            raise RequestError(f"control image {str(image)!r} is not a readable image ({e})") from None
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise RequestError(f"canny needs an 8-bit image, got an array of {arr.dtype} {arr.shape}")
    edges = cv2.Canny(arr, low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def parse_control(text: str) -> tuple[str, str, float]:
    """``KIND:IMAGE[:SCALE]`` -> (kind, image path, scale); ``canny`` computes edges from the
    image, any other kind (pose, depth, ...) uses the image as it is."""
    parts = str(text).split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise RequestError(f"--control {text!r} must be KIND:IMAGE[:SCALE] (e.g. canny:photo.png:0.8)")
    kind, scale = parts[0].lower(), 1.0
    if len(parts) > 2:
        try:
            scale = float(parts[-1])
            parts = parts[:-1]
        except ValueError:
            if len(parts) == 3:
                raise RequestError(f"--control {text!r}: the scale {parts[-1]!r} is not a number") from None
    if kind not in KINDS:
        raise RequestError(f"--control {text!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind, ":".join(parts[1:]), scale


def control_image(kind: str, path: str):
    """The control image of a ``--control`` entry: canny edges of ``path``, or ``path`` itself."""
    return canny(path) if kind == "canny" else path


def keep_table(start: float, end: float, first: int, num_steps: int) -> np.ndarray:
    """float32 [num_steps]: 1 where a ControlNet acts at sampler step ``i``, 0 elsewhere.

    As diffusers' ``controlnet_keep``: over the ``n = num_steps - first`` steps that run (an
    img2img run starts at ``first``), step ``j`` keeps the ControlNet unless ``j / n < start``
    or ``(j + 1) / n > end`` (computed here in float64, exactly as there)."""
    n = num_steps - first
    keep = np.zeros(num_steps, np.float32)
    for j in range(n):
        keep[first + j] = 1.0 - float(j / n < start or (j + 1) / n > end)
    return keep
