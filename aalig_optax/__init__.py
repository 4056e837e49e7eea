"""aalig-optax: AALIG (Adaptive ALI-G) and ALI-G as Optax transforms."""

from aalig_optax._optimizer import aalig
from aalig_optax._optimizer import STATIC_ARGS
from aalig_optax._aalig import scale_by_aalig
from aalig_optax._aov import current_aovs
from aalig_optax._aov import update_aovs
from aalig_optax._aov import update_aovs_anneal
from aalig_optax._aov import update_aovs_reflect
from aalig_optax._initial import loss_table
from aalig_optax._metrics import aalig_metrics
from aalig_optax._metrics import check_hyperparams
from aalig_optax._metrics import check_indices
from aalig_optax._state import AaligConfig
from aalig_optax._state import ScaleByAaligState
from aalig_optax._alig import alig
from aalig_optax._alig import project_l2_ball
from aalig_optax._alig import scale_by_alig
from aalig_optax._alig import ScaleByAligState
from aalig_optax._checkpoint import CheckpointManager
from aalig_optax._checkpoint import restore_state
from aalig_optax._checkpoint import save_state
from aalig_optax._checkpoint import validate_state
from aalig_optax._sharding import process_example_range
from aalig_optax._sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
    "STATIC_ARGS",
    "aalig",
    "aalig_metrics",
    "AaligConfig",
    "check_hyperparams",
    "CheckpointManager",
    "alig",
    "check_indices",
    "current_aovs",
    "loss_table",
    "process_example_range",
    "project_l2_ball",
    "restore_state",
    "save_state",
    "scale_by_aalig",
    "scale_by_alig",
    "ScaleByAaligState",
    "ScaleByAligState",
    "state_shardings",
    "update_aovs",
    "update_aovs_anneal",
    "update_aovs_reflect",
    "validate_state",
)
