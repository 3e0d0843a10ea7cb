"""framer_dist: distributed trainer for FRAMER on DiT4SR-style SD3/SD3.5 super-resolution models."""

__version__ = "0.1.0"
