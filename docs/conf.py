"""Sphinx configuration of the user guide (MyST Markdown pages)."""

project = "Graph mode for vLLM on Ascend"
author = "vLLM Ascend graph-mode contributors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 3
html_theme = "alabaster"
