"""newllm-kit's built-in plugins, installed as `newllm_kit_plugins`.

Each module here is one plugin, registered through the `newllm_kit` entry-point group in
pyproject.toml exactly like a third-party package; the core never imports these by name.
"""
