"""mmc: a compiler for multimodal (vision-language) transformer inference.

Python API (mirrors the CLI):
    import mmc
    engine_dir = mmc.compile("tiny-qwen2.5-vl", passes="all", output="tiny.mmc")
    engine = mmc.load(engine_dir)
    print(engine.generate("Describe the image.", images=["cat.png"], max_new_tokens=32).text)
"""

__version__ = "0.1.0"


def compile(model=None, **kwargs):  # noqa: A001  (mirrors `mmc compile`)
    from .api import compile_model

    return compile_model(model, **kwargs)


def load(path, **kwargs):
    from mmc.runtime import load as _load

    return _load(path, **kwargs)
