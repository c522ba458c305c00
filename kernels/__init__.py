"""kernels/: move and compute. Dispatch backends consume plain plan arrays, never router objects.

Shape letters: T tokens, D hidden, E experts, K choices per token, C capacity per expert,
R requested assignments, N kept assignments, F expert ffn width.

Flow: ``make_dispatch`` (capacity via ``positions``) -> ``moe_forward`` on a backend from
``BACKENDS`` (permute -> ``ExpertFFN`` -> combine): 'torch' (index ops, the CPU path and the
oracle), 'einsum' (one-hot mask baseline), 'triton' (the shared Triton kernels; CUDA, or CPU under
TRITON_INTERPRET=1; ``resolve_backend`` says which really runs). ``kernels.reference`` is the
plain loop implementation the backends are tested against.
"""

from .dispatch import LAYOUTS, Dispatch, analytic_buffer_bytes, make_dispatch
from .experts import ExpertFFN, expert_flops
from .layer import (
    BACKENDS,
    STAGES,
    available_backends,
    get_backend,
    list_backends,
    moe_forward,
    resolve_backend,
)
from .positions import expert_counts, kept_mask, positions

__all__ = [
    "BACKENDS",
    "LAYOUTS",
    "STAGES",
    "Dispatch",
    "ExpertFFN",
    "analytic_buffer_bytes",
    "available_backends",
    "expert_counts",
    "expert_flops",
    "get_backend",
    "kept_mask",
    "list_backends",
    "make_dispatch",
    "moe_forward",
    "positions",
    "resolve_backend",
]
