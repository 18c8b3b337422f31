"""vLLM platforms of the plugin: the NPU platform and its CPU twin."""
