"""Views decoded and cut on a torch device (`--decode gpu`): one decode of each image, all its views.

Loader workers read an image file's bytes and its header's size (so its views' boxes are
known, pipeline.views); the process that owns the device decodes a batch of JPEGs in one
call (torchvision's `decode_jpeg`, nvJPEG on CUDA), resizes every view of an image from that
one decode (pipeline.resample: Pillow's integer resize, the same pixels on any device) and
flips it there. nvJPEG has no reduced-scale decoding, so JPEGs are decoded whole (no draft).

A file that is no JPEG, or a JPEG of other than RGB or grey pixels (CMYK), by its header, is
decoded by Pillow on the CPU and cut on the device alike; so is a JPEG the device decoder
refuses (some progressive files, a damaged one), named in the log. One Pillow cannot read
either is unreadable (extraction stops, or skips it with --skip-corrupt). An error of the
device itself (its memory, its driver) stops the run: which decoder an image gets depends on
its bytes alone, so stage two, decoding as the store records, gets the pixels stage one got.
"""

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.files import DECODE_ERRORS, ImageFile, unreadable
from pipeline.errors import PipelineError
from pipeline.resample import resize_views


def require_cuda(device: torch.device, what: str, fix: str) -> None:
    """Stop unless `device` is a CUDA GPU: `what` (it decodes JPEGs on one) and the `fix` name the way out."""
    if device.type != "cuda":
        raise PipelineError(f"{what} JPEGs on a CUDA GPU with nvJPEG, and this run's device is {device}; {fix}")


@dataclass
class EncodedImage:
    """What a loader worker reads of one image file: its bytes, the size its header gives, and whether the
    device decodes it (a JPEG of RGB or grey pixels, by its header; CMYK and other files go to Pillow)."""

    path: str
    data: np.ndarray  # uint8, the file's bytes
    height: int
    width: int
    on_device: bool


def read_encoded(source: ImageFile) -> EncodedImage:
    try:
        data = np.frombuffer(source.path.read_bytes(), dtype=np.uint8)
    except OSError as error:
        raise unreadable(source.path, error) from None
    return EncodedImage(str(source.path), data, source.height, source.width,
                        source.format == "JPEG" and source.mode in ("RGB", "L"))


def device_failure(error: RuntimeError) -> bool:
    """An error of the device, not of the file (memory, the driver): it stops the run, never sends a file to
    Pillow, which would make the decoder an image gets depend on the moment."""
    text = str(error)
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "CUDA error" in text


class DeviceDecoder:
    """Decodes EncodedImages on `device` to uint8 (C, H, W) and cuts their views there; `say` names each
    file that went to Pillow (once)."""

    def __init__(self, device: torch.device, say: Callable[[str], None] = print):
        self.device, self.say, self.named = device, say, set()

    def decode(self, images: list[EncodedImage]) -> list[torch.Tensor | PipelineError]:
        """Each image's pixels on the device, or the error that makes it unreadable."""
        decoded = self.decode_on_device(images, [i for i, image in enumerate(images) if image.on_device])
        results = []
        for i, image in enumerate(images):
            try:
                results.append(self.checked(image, decoded[i] if i in decoded else self.decode_on_cpu(image)))
            except PipelineError as error:
                results.append(error)
        return results

    def decode_on_device(self, images: list[EncodedImage], indices: list[int]) -> dict[int, torch.Tensor]:
        """{index: pixels} of the images at `indices` the device decodes: all in one call, or, when one file
        fails the call, one by one (a file the device refuses is left to Pillow and named)."""
        try:
            return dict(zip(indices, self.decode_jpegs([images[i] for i in indices]))) if indices else {}
        except RuntimeError as error:
            if device_failure(error):
                raise
        decoded = {}
        for i in indices:
            try:
                decoded[i] = self.decode_jpegs([images[i]])[0]
            except RuntimeError as error:
                if device_failure(error):
                    raise
                if images[i].path not in self.named:
                    self.named.add(images[i].path)
                    self.say(f"decoding {images[i].path} with Pillow on the CPU ({self.device} refused it: "
                             f"{str(error).splitlines()[-1][:120]})")
        return decoded

    def decode_jpegs(self, images: list[EncodedImage]) -> list[torch.Tensor]:
        data = [torch.from_numpy(image.data.copy()) for image in images]
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def decode_on_cpu(self, image: EncodedImage) -> torch.Tensor:
        try:
            with Image.open(io.BytesIO(image.data.tobytes())) as opened:
                pixels = np.asarray(opened.convert("RGB"))
        except DECODE_ERRORS as error:
            raise unreadable(Path(image.path), error) from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).to(self.device)

    @staticmethod
    def checked(image: EncodedImage, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[1:]) != (image.height, image.width):
            raise PipelineError(f"{image.path} decoded to {pixels.shape[2]}x{pixels.shape[1]} pixels, and its header "
                                f"says {image.width}x{image.height}; replace the file, or pass --skip-corrupt to skip "
                                "and record it")
        return pixels

    def views(self, images: list[EncodedImage | None], boxes: torch.Tensor, flips: torch.Tensor,
              sizes: list[tuple[tuple[int, int], str]], errors: list[str]) -> tuple[tuple[torch.Tensor, ...], list[str]]:
        """Per (size, interpolation) in `sizes`, uint8 (N, K, h, w, C) on the device: each image's K views (its
        boxes (N, K, 4) resized, flipped where `flips` (N, K) says), all from one decode; and `errors` (each
        image's error text, "" when readable, None for its image) with those of the images that fail to
        decode added. An unreadable image's views are black."""
        errors = list(errors)
        readable = [n for n, image in enumerate(images) if image is not None]
        decoded = self.decode([images[n] for n in readable])
        kept = []
        for n, pixels in zip(readable, decoded):
            if isinstance(pixels, PipelineError):
                errors[n] = str(pixels)
            else:
                kept.append((n, pixels))
        count = boxes.shape[1]
        turned = torch.as_tensor(flips, dtype=torch.bool).to(self.device)[:, :, None, None, None]
        out = []
        for (height, width), interpolation in sizes:
            views = torch.zeros(len(images), count, 3, height, width, dtype=torch.uint8, device=self.device)
            if kept:
                index = torch.tensor([n for n, _ in kept], device=self.device)
                views[index] = resize_views([pixels for _, pixels in kept], boxes[index.cpu()], (height, width),
                                            interpolation)
            out.append(torch.where(turned, views.flip(-1), views).permute(0, 1, 3, 4, 2))
        return tuple(out), errors
