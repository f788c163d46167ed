"""mmc runtime: load an engine folder and generate text from prompts and images.

    from mmc.runtime import load
    engine = load("tiny-qwen2.5-vl.mmc")
    engine.generate("What is in the picture?", images=["photo.jpg"], max_new_tokens=32).text

Needs onnxruntime, numpy, safetensors and transformers (tokenizer, image processor); not torch.
"""

from .engine import Engine, GenerationResult, StreamChunk, load

__all__ = ["Engine", "GenerationResult", "StreamChunk", "load"]
