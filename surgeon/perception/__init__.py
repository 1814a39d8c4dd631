"""Perception and reasoning: the reweighted SFT loss (``reweight``), the perception-aware RL
reward (``reward``) and ``surgeon diagnose`` (``diagnose``).
"""
