"""Adapters to RL frameworks. Each is imported only when used (`jengine.integrations.tunix`
needs `pip install "jengine[tunix]"`)."""
