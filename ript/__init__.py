"""ript: RIPT-VLA interactive post-training on the QueST policy (Tan et al. 2025)."""

__version__ = "0.1.0"
