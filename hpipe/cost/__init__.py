"""Cost models: how long a layer range takes on a device, a transfer on a link, and memory."""

from hpipe.cost.base import CostModel

__all__ = ["CostModel"]
