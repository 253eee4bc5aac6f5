"""Views: the exact crop a teacher saw at extraction and a student sees in stage two.

A view is a box (x0, y0, x1, y1) in the source image's pixels, which may reach past the
image (the outside is black), and a horizontal flip. Rendering it for a model crops the
box, resizes it to the model's input size and flips it, so every teacher and the student
see one view alike, each at its own resolution, and every cached map covers exactly the
student's image.

View 0 is the eval view: the data set's centre crop (crop / resize of the shorter side)
for image files, the whole image for in-memory sets. Views 1..K-1 are random: torchvision's
RandomResizedCrop geometry (area 8-100 %, aspect 3/4-4/3) for image files, crops of the
image padded by `shift` pixels for in-memory sets, each flipped with probability 1/2 where
the data set's classes are mirror-symmetric. They are a pure function of the policy (its
seed and settings), the sample's id, its source image's size and the view number (drawn in
order, so more views keep the first ones): extraction is deterministic, resumable and
block-parallel, and stage two can check that an image file is still the one the views were
cut from.

With `draft`, a JPEG view is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that still
leaves its box at least its output size (libjpeg decodes 1/s of each side at about 1/s^2 of
the cost), and the box is cut from that smaller image at its fractional position. The scale
is a function of the box and the output size, so a teacher and a student of one size get
the same pixels; the policy records it, and stage two renders as stage one did.
"""

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # the data sets build their sources from this module's renderer
    from pipeline.data.base import DatasetInfo

RESIZED_CROP_SCALE, RESIZED_CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop defaults


@dataclass(frozen=True)
class ViewPolicy:
    count: int = 1  # K views per sample, view 0 the eval view
    seed: int = 0
    flip: bool = False  # random views are flipped at random (mirror-symmetric classes only)
    shift: int = 0  # in-memory sets: random views are crops of the image padded by this many pixels
    eval_crop: float | None = None  # image files: the eval view's side over the shorter side (crop / resize)
    draft: bool = False  # image files: JPEG views decoded at a reduced scale where the box allows it
    decoder: str | None = None  # image files: the builds that render views (image_decoder or gpu_decoder)

    @classmethod
    def of(cls, info: "DatasetInfo", count: int = 1, seed: int = 0, shift: int = 4,
           draft: bool = False, decode: str = "cpu") -> "ViewPolicy":
        """The policy of data set `info`: resized crops of image files, padded crops of in-memory images,
        decoded on the CPU (Pillow) or the GPU (nvJPEG, whole images: no draft)."""
        if count < 1:
            raise PipelineError(f"--views must be at least 1 (1: the eval view only); got {count}")
        files = info.geometry is not None
        if decode == "gpu" and not files:
            raise PipelineError(f"--decode gpu decodes image files, and {info.name} is held in memory; "
                                "use --decode cpu")
        gpu = decode == "gpu"
        policy = cls(count, seed, info.mirror_symmetric and count > 1, 0 if files or count == 1 else shift,
                     info.geometry.crop / info.geometry.resize if files else None, draft and files and not gpu,
                     (gpu_decoder() if gpu else image_decoder()) if files else None)
        if count > 1 and not (files or policy.shift or policy.flip):
            raise PipelineError(f"--views {count}: random views of {info.name} need --view-shift above 0 (its "
                                "classes are not mirror-symmetric, so views are not flipped)")
        return policy

    def as_dict(self) -> dict:
        return asdict(self)

    def boxes(self, sample_id: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, 4) int32 boxes (x0, y0, x1, y1) and (K,) flips of one sample whose source is height x width."""
        boxes, flips = np.zeros((self.count, 4), np.int32), np.zeros(self.count, bool)
        boxes[0] = self.eval_box(height, width)
        rng = np.random.default_rng([self.seed, sample_key(sample_id)])
        for v in range(1, self.count):
            boxes[v] = resized_crop_box(rng, height, width) if self.eval_crop else padded_crop_box(
                rng, height, width, self.shift)
            flips[v] = self.flip and rng.random() < 0.5
        return boxes, flips

    def eval_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        if self.eval_crop is None:
            return 0, 0, width, height
        side = min(round(min(height, width) * self.eval_crop), height, width)
        top, left = round((height - side) / 2), round((width - side) / 2)
        return left, top, left + side, top + side


def sample_key(sample_id: str) -> int:
    """A sample's id as a 64-bit seed: views follow the sample, not its position in a list."""
    return int.from_bytes(hashlib.sha256(sample_id.encode()).digest()[:8], "little")


def resized_crop_box(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (ten tries, then a centre crop of bounded aspect),
    drawn from `rng` instead of torch's global generator."""
    area, (low, high) = height * width, np.log(RESIZED_CROP_RATIO)
    for _ in range(10):
        target = area * rng.uniform(*RESIZED_CROP_SCALE)
        aspect = math.exp(rng.uniform(low, high))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    ratio = width / height
    if ratio < RESIZED_CROP_RATIO[0]:
        w, h = width, round(width / RESIZED_CROP_RATIO[0])
    elif ratio > RESIZED_CROP_RATIO[1]:
        w, h = round(height * RESIZED_CROP_RATIO[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def padded_crop_box(rng: np.random.Generator, height: int, width: int, shift: int) -> tuple[int, int, int, int]:
    """A crop of the image's size from the image padded by `shift` on every side."""
    dx, dy = (int(d) for d in rng.integers(-shift, shift + 1, 2))
    return dx, dy, dx + width, dy + height


def image_decoder() -> str:
    """The builds that turn a file's view into pixels: JPEG decoding (libjpeg-turbo or IJG, its DCT
    scaling) and PIL's resampling differ between them, so a store records them and stage two checks."""
    turbo = features.version_feature("libjpeg_turbo")
    return f"Pillow {PIL.__version__}, libjpeg {features.version('jpg')}" + (f" (libjpeg-turbo {turbo})" if turbo else "")


GPU_DECODER = "nvJPEG"  # how a decoder that decodes on the GPU is named first (pipeline.device_views)


def gpu_decoder() -> str:
    """What turns a file's view into pixels on the GPU: torchvision's nvJPEG decoding on this GPU (nvJPEG uses
    a hardware decoder where the GPU has one, A100 and later, and CUDA cores elsewhere: their pixels may
    differ), this package's integer resize (pipeline.resample), and Pillow for the files nvJPEG refuses."""
    gpu = (f"{torch.cuda.get_device_name()}, sm_{''.join(map(str, torch.cuda.get_device_capability()))}"
           if torch.cuda.is_available() else "no CUDA GPU")
    return (f"{GPU_DECODER} (torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, {gpu}), "
            f"pipeline.resample; other files: {image_decoder()}")


def decodes_on_gpu(decoder: str | None) -> bool:
    return bool(decoder) and decoder.startswith(GPU_DECODER)


def draft_scale(box, size: tuple[int, int]) -> int:
    """The largest JPEG reduction s (of 2, 4, 8) whose decode leaves the box at least `size` (h, w)
    pixels, so the resize after it still only shrinks; 1 where there is none."""
    width, height = box[2] - box[0], box[3] - box[1]
    return next((s for s in (8, 4, 2) if width >= s * size[1] and height >= s * size[0]), 1)


def render(image: Image.Image, box, flip: bool, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """A view of a decoded image -> uint8 (h, w, C) at `size` (h, w): the box, which may be fractional,
    resized with antialiasing (PIL's, as torchvision's RandomResizedCrop of a PIL image), then flipped.
    A box reaching past the image is cropped first, black outside (in-memory views, never resized)."""
    height, width = size
    resample = Image.Resampling[interpolation.upper()]
    x0, y0, x1, y1 = (float(v) for v in box)
    if x0 >= 0 and y0 >= 0 and x1 <= image.width and y1 <= image.height:
        view = image.resize((width, height), resample, box=(x0, y0, x1, y1))
    else:
        view = image.crop(tuple(int(v) for v in box))  # PIL fills what lies past the image with black
        if view.size != (width, height):
            view = view.resize((width, height), resample)
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(view)
    return pixels[..., None] if pixels.ndim == 2 else pixels


class PixelSource:
    """Views of an image held in memory, uint8 (H, W, C)."""

    def __init__(self, pixels: np.ndarray):
        self.height, self.width = pixels.shape[:2]
        self.image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)

    def view(self, box, flip: bool, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
        return render(self.image, box, flip, size, interpolation)


def epoch_view(seed: int, epoch: int, block: int, count: int) -> int:
    """The view every sample of `block` uses in `epoch`: a seeded order of the K views per block, cycled,
    so each view is used once in every K epochs (the views of a block's samples are drawn independently,
    so sharing a view number within a block shares no crop)."""
    if count == 1:
        return 0
    return int(np.random.default_rng([seed, block, 0x71E35]).permutation(count)[epoch % count])
