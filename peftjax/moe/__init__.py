"""Mixture-of-Experts: routers, sorted and one-hot dispatch, expert parallelism, upcycling."""
# peftjax.models.bert imports moe.layer, and moe.layer imports peftjax.models.logical: load the
# models package first, or importing peftjax.moe before peftjax.models fails (circular import).
import peftjax.models  # noqa: F401  pylint: disable=unused-import
from peftjax.moe.dispatch import EXPERT_KERNELS
from peftjax.moe.dispatch import expert_mlp
from peftjax.moe.dispatch import onehot_moe
from peftjax.moe.dispatch import ragged_moe
from peftjax.moe.dispatch import sorted_moe
from peftjax.moe.layer import DISPATCHES
from peftjax.moe.layer import ROUTERS
from peftjax.moe.layer import MoeConfig
from peftjax.moe.layer import MoeFFN
from peftjax.moe.losses import aux_losses
from peftjax.moe.losses import layer_stats
from peftjax.moe.parallel import expert_mesh
from peftjax.moe.parallel import sharded_sorted_moe
from peftjax.moe.routing import capacity
from peftjax.moe.routing import expert_choice_route
from peftjax.moe.routing import positions_onehot
from peftjax.moe.routing import positions_sorted
from peftjax.moe.routing import router_stats
from peftjax.moe.routing import top_k_route
from peftjax.moe.routing import top_k_slots
from peftjax.moe.upcycle import UpcycleError
from peftjax.moe.upcycle import upcycle_ffn
from peftjax.moe.losses import SCALARS
