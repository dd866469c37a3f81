"""newllm-kit's built-in plugins, installed as `newllm_kit_plugins`, one package per family.

Each entry point in pyproject.toml's `newllm_kit` group names one module here and is loaded exactly
like a third-party package's; the core never imports these by name. `cvfp/` is the CVFP model and
its recipe, `lm/` the `lm` recipe and its baselines, `data/` corpora, `tokens/` tokenizers and
embedding tables, `runners/` where a unit runs; `metrics.py` and `hub.py` serve every family.
"""
