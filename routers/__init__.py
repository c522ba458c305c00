"""routers/: routers decide. Each maps a Batch to a Plan of requested assignments.

Shape letters: T tokens, D hidden, E experts, K choices per token, C capacity per expert,
R requested assignments, N kept assignments, G groups or devices, V vocabulary.
"""

from .contract import (
    Batch,
    Plan,
    Router,
    RouterConfig,
    RoutingError,
    capacity,
    choice_major,
    load_balancing_loss,
    softmax_lse,
    z_loss,
)
from .registry import (
    ENTRY_POINT_GROUP,
    build_router,
    get_router_class,
    list_routers,
    load_plugin,
    loaded_plugins,
    register_router,
    router_names,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Batch",
    "Plan",
    "Router",
    "RouterConfig",
    "RoutingError",
    "build_router",
    "capacity",
    "choice_major",
    "get_router_class",
    "list_routers",
    "load_balancing_loss",
    "load_plugin",
    "loaded_plugins",
    "register_router",
    "router_names",
    "softmax_lse",
    "z_loss",
]
