"""Host glue before the graphs run: prompt formatting, tokenization, image loading/preprocessing.

The tokenizer and the image processor are the model's own, loaded from the engine's assets
(copied from the checkpoint directory at compile time). `<image>` in a prompt marks where an
image goes; without markers the images come first, as in Qwen's chat format. Each image
placeholder is expanded to grid_t*grid_h*grid_w / merge² `<|image_pad|>` tokens, as
Qwen2.5-VL's processor does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmc.errors import MmcError, first_line

IMAGE_MARKER = "<image>"


@dataclass
class PreparedInputs:
    input_ids: np.ndarray            # [S] int64
    pixel_values: np.ndarray | None  # [N, C*T*P*P] float32
    image_grid_thw: np.ndarray       # [num_images, 3] int64


def load_image(image):
    """A PIL image from a path, bytes-like path, numpy HWC uint8 array or PIL image."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise MmcError(f"image array must be HxWx3 (got shape {image.shape})")
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    if not isinstance(image, str | Path):
        raise MmcError(f"an image must be a path, PIL image or HxWx3 array (got {type(image).__name__})")
    path = Path(image)
    if path.is_dir():
        raise MmcError(f"image {path} is a directory, not an image file")
    if not path.is_file():
        raise MmcError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MmcError(f"image {path} cannot be decoded ({type(e).__name__}: {first_line(e) or 'bad data'})") from e


class Processor:
    def __init__(self, assets: Path, host: dict):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.host = host
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(assets))
            self.image_processor = None
            if (assets / "preprocessor_config.json").is_file():
                self.image_processor = AutoImageProcessor.from_pretrained(str(assets))
        except Exception as e:  # transformers raises many types for missing/broken files
            raise MmcError(f"tokenizer/image processor in {assets} cannot be loaded "
                           f"({type(e).__name__}: {first_line(e, limit=160)})") from e
        vocab = self.tokenizer.get_vocab()
        self.image_pad = "<|image_pad|>"
        self.vision_start = "<|vision_start|>"
        self.vision_end = "<|vision_end|>"
        if host.get("image_token_id") is not None and vocab.get(self.image_pad) != host["image_token_id"]:
            raise MmcError("engine assets are inconsistent: tokenizer's <|image_pad|> id does not match the model")

    def format_prompt(self, prompt: str, num_images: int) -> str:
        """Insert one vision block per image: at each `<image>` marker, else before the text."""
        block = f"{self.vision_start}{self.image_pad}{self.vision_end}"
        markers = prompt.count(IMAGE_MARKER) if self.host.get("image_token_id") is not None else 0
        if markers and markers != num_images:
            raise MmcError(f"prompt has {markers} {IMAGE_MARKER} markers but {num_images} images were given")
        if markers:
            text = prompt.replace(IMAGE_MARKER, block)
        else:
            text = block * num_images + prompt
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return text

    def prepare(self, prompt: str, images=()) -> PreparedInputs:
        images = [load_image(im) for im in images]
        if images and self.image_processor is None:
            raise MmcError("this engine has no image processor; it cannot take images")
        pixel_values, grid = None, np.zeros((0, 3), dtype=np.int64)
        if images:
            try:
                out = self.image_processor(images=images, return_tensors="np")
            except ValueError as e:  # e.g. extreme aspect ratios the processor refuses
                raise MmcError(f"image rejected by the model's processor: {first_line(e, limit=10_000)}") from e
            pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
            grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
        for special in (self.image_pad, self.vision_start, self.vision_end, "<|video_pad|>"):
            if special in prompt:
                raise MmcError(f"the prompt contains the reserved token {special}; mark images with {IMAGE_MARKER}")
        text = self.format_prompt(prompt, len(images))
        if not images:
            return PreparedInputs(self._tokenize(text), None, grid)
        merge2 = self.host["spatial_merge_size"] ** 2
        pieces = text.split(self.image_pad)
        expanded = pieces[0]
        for i, rest in enumerate(pieces[1:]):
            expanded += self.image_pad * int(grid[i].prod() // merge2) + rest
        return PreparedInputs(self._tokenize(expanded), pixel_values, grid)

    def _tokenize(self, text: str) -> np.ndarray:
        ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        if ids.size == 0:
            raise MmcError("the prompt is empty")
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
