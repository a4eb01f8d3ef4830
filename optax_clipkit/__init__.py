"""optax_clipkit: gradient clipping done right, as optax transformations.

Import as ``import optax_clipkit as clipkit``.
"""

from optax_clipkit._adaptive import adaptive as adaptive
from optax_clipkit._adaptive import AdaptiveState as AdaptiveState
from optax_clipkit._autoclip import autoclip as autoclip
from optax_clipkit._autoclip import AutoClipState as AutoClipState
from optax_clipkit._global_norm import global_norm as global_norm
from optax_clipkit._global_norm import GlobalNormState as GlobalNormState
from optax_clipkit._metrics import metrics as metrics
from optax_clipkit._monitor import monitor as monitor
from optax_clipkit._monitor import MonitorState as MonitorState
from optax_clipkit._per_leaf_norm import per_leaf_norm as per_leaf_norm
from optax_clipkit._per_module import per_module as per_module
from optax_clipkit._per_leaf_norm import PerLeafNormState as PerLeafNormState
from optax_clipkit._skip import skip_spikes as skip_spikes
from optax_clipkit._skip import SkipSpikesState as SkipSpikesState
from optax_clipkit._value import value as value
from optax_clipkit._value import ValueState as ValueState
from optax_clipkit._zscore import zclip as zclip
from optax_clipkit._zscore import ZClipState as ZClipState

__version__ = "0.1.0"

__all__ = (
    "AdaptiveState",
    "AutoClipState",
    "GlobalNormState",
    "MonitorState",
    "PerLeafNormState",
    "SkipSpikesState",
    "ValueState",
    "ZClipState",
    "adaptive",
    "autoclip",
    "global_norm",
    "metrics",
    "monitor",
    "per_leaf_norm",
    "per_module",
    "skip_spikes",
    "value",
    "zclip",
)
