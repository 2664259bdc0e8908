"""warmpool: a warm-pool reverse proxy for local LLM servers."""

__version__ = "0.1.0"
