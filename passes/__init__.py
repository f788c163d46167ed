"""mmc's built-in passes, one per file. Importing this package registers them.

The import order below is the default pipeline order (`--passes all`):
    fold-constants -> canonicalize -> cse -> fuse-norms -> fuse-rotary -> fuse-attention
    -> fuse-swiglu -> horizontal-gemm -> fuse-skip-norm -> cse -> dce
(cse and dce are registered once; the pipeline lists them where they run.)
"""

from . import constant_folding  # noqa: F401, I001  (registration order is the pipeline order)
from . import canonicalize  # noqa: F401
from . import cse  # noqa: F401
from . import fuse_norms  # noqa: F401
from . import fuse_rotary  # noqa: F401
from . import fuse_attention  # noqa: F401
from . import fuse_swiglu  # noqa: F401
from . import horizontal_gemm  # noqa: F401
from . import fuse_skip_norm  # noqa: F401
from . import dead_code  # noqa: F401
from . import smooth_quant  # noqa: F401  (not in the default pipeline: --int8 w8a8 adds it)
from . import quantize_weights  # noqa: F401  (not in the default pipeline: --int8 / --int4 / --fp8 add it)
from . import quantize_activations  # noqa: F401  (not in the default pipeline: --int8 w8a8 / --fp8 add it)
from . import quantize_kv_cache  # noqa: F401  (not in the default pipeline: --kv-cache int8 / fp8 adds it)
