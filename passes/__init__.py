"""mmc's built-in passes, one per file. Importing this package registers them.

The import order below is the default pipeline order (`--passes all`):
    fold-constants -> cse -> dce
"""

from . import constant_folding, cse, dead_code  # noqa: F401  (registration side effects)
