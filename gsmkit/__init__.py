"""gsmkit: fine-tune and evaluate causal language models on GSM8K.

Nothing heavy is imported here, so `gsmkit --help` stays fast.
"""

__version__ = "0.1.0"
