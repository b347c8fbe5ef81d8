"""Evaluations: records in, a metrics dataclass out (gsm8k accuracy; later perplexity and safety)."""
