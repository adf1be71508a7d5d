"""hpipe: long-context LLM inference pipelined across heterogeneous devices."""

__version__ = "0.1.0"
