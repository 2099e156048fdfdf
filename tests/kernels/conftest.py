"""The kernel tests run Triton's interpreter on CPU tensors. TRITON_INTERPRET must be set
before triton.jit decorates the kernels (at their first import), so it is set here, at
collection, unless the caller set it (CI sets it for the whole run)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
