"""Workers and model runners of the plugin's platforms."""
