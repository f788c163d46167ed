"""mmc's built-in passes, one per file. Importing this package registers them.

The import order below is the default pipeline order (`--passes all`):
    fold-constants -> canonicalize -> cse -> dce
"""

from . import constant_folding  # noqa: F401, I001  (registration order is the pipeline order)
from . import canonicalize  # noqa: F401
from . import cse  # noqa: F401
from . import dead_code  # noqa: F401
