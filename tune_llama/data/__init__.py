"""GSM8K data: load problems (synthetic, embedded mini slice, local directory, hub), encode them, batch them.

Imports no optional package: ``datasets`` is imported only when a hub id is loaded.
"""

from tune_llama.data.batching import count_batches, make_batches, real_token_share
from tune_llama.data.examples import IGNORE_INDEX, Encoded, encode, format_prompt
from tune_llama.data.sources import Splits, final_answer, load_splits, load_test

__all__ = [
    "IGNORE_INDEX", "Encoded", "Splits", "count_batches", "encode", "final_answer", "format_prompt",
    "load_splits", "load_test", "make_batches", "real_token_share",
]
