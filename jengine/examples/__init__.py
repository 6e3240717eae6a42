"""Runnable examples: `python -m jengine.examples.rl_toy`."""
