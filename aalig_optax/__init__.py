"""aalig-optax: AALIG (Adaptive ALI-G) and ALI-G as Optax gradient transformations."""

from aalig_optax._aalig import aalig
from aalig_optax._aalig import aalig_metrics
from aalig_optax._aalig import check_indices
from aalig_optax._aalig import scale_by_aalig
from aalig_optax._aalig import ScaleByAaligState
from aalig_optax._aalig import update_aovs
from aalig_optax._alig import alig
from aalig_optax._alig import project_l2_ball
from aalig_optax._alig import scale_by_alig
from aalig_optax._alig import ScaleByAligState

__version__ = "0.1.0"

__all__ = (
    "aalig",
    "aalig_metrics",
    "alig",
    "check_indices",
    "project_l2_ball",
    "scale_by_aalig",
    "scale_by_alig",
    "ScaleByAaligState",
    "ScaleByAligState",
    "update_aovs",
)
