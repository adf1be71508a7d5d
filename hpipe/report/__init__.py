"""Reports: Chrome traces, PNG Gantt charts, tables and the paper-experiment report.

Everything here takes Timelines (and the Plans behind them) and returns strings or writes the
files it is asked to write; only the CLI prints.
"""

from hpipe.report.gantt import plot_timelines
from hpipe.report.trace import chrome_trace, write_chrome_trace

__all__ = ["chrome_trace", "plot_timelines", "write_chrome_trace"]
