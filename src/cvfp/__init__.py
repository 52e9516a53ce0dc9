"""cvfp: the Context Vector Fixed-Point (New-LLM) research pipeline library."""

__version__ = "0.1.0"
