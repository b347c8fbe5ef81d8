"""Data sources: GSM8K (Hub id or local file/folder), the few-shot pool, benchmark converters."""
