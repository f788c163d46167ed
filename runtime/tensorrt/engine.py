"""Loading a target "tensorrt" engine folder (compiler/tensorrt.py writes it).

What is checked, before anything else, with one clear error naming both sides when it fails:
the TensorRT flavour and version the engine was built with are importable here, a CUDA GPU is
present, and its compute capability is one the engine was built for (runtime/tensorrt).
Where all hold, the serialized engines are deserialized with mmc's plugin creators registered
and an execution context is made per optimization profile (decoder: prefill and decode).
The generation loop over them (embedding, binding the I/O and the KV-cache buffers by address
per phase, the decode steps) is not implemented in this release: no GPU reachable from this
project can run a TensorRT engine with plugins, so it could not be tested (plugins/tensorrt.py's
enqueue is written but has not run either).
"""

from __future__ import annotations

from pathlib import Path

from mmc.errors import MmcError

from .. import engine_format as fmt
from . import require_gpu


class TensorRTEngine:
    target = "tensorrt"

    def __init__(self, path: str | Path, device: str = "auto", verify: bool = True, **options):
        self.root = Path(path)
        self.manifest = fmt.read_manifest(self.root, verify_hashes=verify)
        if self.manifest["target"] != self.target:
            raise MmcError(f"engine {self.root} is for target {self.manifest['target']!r}; this runtime runs 'tensorrt'")
        if device == "cpu":
            raise MmcError("a tensorrt engine runs on a CUDA GPU, not on the CPU (compile for --target ort or cuda)")
        trt, _ = require_gpu(self.manifest["target_info"])
        from mmc.plugins.tensorrt import register

        register(trt)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name, comp in self.manifest["components"].items():
            blob = fmt.inside(self.root, comp["engine"]).read_bytes()
            engine = self.runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise fmt.EngineError(f"engine {self.root}: TensorRT could not deserialize {comp['engine']}")
            self.engines[name] = engine
            for phase, index in comp["profiles"].items():
                ctx = engine.create_execution_context()
                ctx.set_optimization_profile_async(index, 0)
                self.contexts[(name, phase)] = ctx

    def generate(self, *args, **kwargs):
        raise MmcError("generating with a tensorrt engine is not implemented in this release "
                       "(the engine loads; its generation loop is not written); use --target cuda to run on this GPU")

    stream = generate
