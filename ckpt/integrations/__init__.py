"""Callbacks for training libraries: `ckpt.integrations.lightning` and `ckpt.integrations.transformers`.

Each module imports its library; `import ckpt` imports neither.
"""
