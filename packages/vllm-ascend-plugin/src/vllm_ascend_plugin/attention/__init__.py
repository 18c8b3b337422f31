"""Attention backends of the plugin's platforms: FULL-graph capable, with per-replay updates."""
