"""Small modules that the bundled custom_tools.yaml points at: examples of YAML python tools."""
