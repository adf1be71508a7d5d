"""Profiling: measure devices (``measure``), links (``links``) and a real pipeline
(``calibrate``), and write a profile file.

This package is where hpipe touches hardware to learn costs. The file format and the fit are
pure and live below it, in ``hpipe.cost.profile_file`` and ``hpipe.cost.fitted``;
``hpipe.cost.cost_model`` is what plan / simulate / run call for ``--profile``.
"""

from __future__ import annotations

# The grid's smallest prompt: its slices start at 16 tokens and need a few sizes above that.
MIN_PROFILE_TOKENS = 32
