"""Cost models: how long a layer range takes on a device, a transfer on a link, and memory.

``cost_model`` picks one (fitted to a profile when there is one, else analytic); the profile
file format the fitted model reads lives here too, below the profiler that writes it.
"""

from hpipe.cost.base import CostModel
from hpipe.cost.profile_file import Profile, check_profile, read_profile
from hpipe.cost.select import cost_model

__all__ = ["CostModel", "Profile", "check_profile", "cost_model", "read_profile"]
