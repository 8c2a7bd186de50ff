"""Preference data: loading (formats, sources, mixtures), tokenisation, fixed-shape batches.

records = load_preferences("data/hh.jsonl:0.5,data/shp.parquet:5000", seed=0)
train, held = split_eval(records, 0.02, seed=0)
pairs, report = tokenize_preferences(train, tokenizer, max_length=1024, max_prompt_length=512)
prompt_ids = encode_prompts(tokenizer, ["2+2="], max_prompt_length=512)  # as a record's prompt_ids
layout = BatchLayout.for_pairs([pairs], rows_per_batch=64, row_length=2048)  # P from the shortest pair
batches = PreferenceBatches(pairs, layout, seed=0)
batch = next(batches)        # this host's rows of the global batch; see batching.py for the layout
position = batches.state()   # {"epoch", "batch", ...}; batches.restore(position) resumes exactly
"""

from jdpo.data.batch import Batch
from jdpo.data.batching import (
    PreferenceBatches,
    make_batch,
    one_pass,
    pack_rows,
)
from jdpo.data.formats import (
    FORMATS,
    LoadReport,
    PreferenceRecords,
    detect_format,
    extract_prompt,
    load_preferences,
    read_source,
    split_eval,
)
from jdpo.data.layout import BatchLayout
from jdpo.data.sources import DataError, parse_source_spec, read_rows
from jdpo.data.tokenize import (
    TokenizedPairs,
    TokenizeReport,
    account_split,
    encode_prompts,
    end_of_turn_id,
    prompt_texts,
    tokenize_preferences,
)

__all__ = [
    "Batch",
    "BatchLayout",
    "FORMATS",
    "DataError",
    "LoadReport",
    "PreferenceBatches",
    "PreferenceRecords",
    "TokenizeReport",
    "TokenizedPairs",
    "account_split",
    "detect_format",
    "encode_prompts",
    "end_of_turn_id",
    "extract_prompt",
    "load_preferences",
    "make_batch",
    "one_pass",
    "pack_rows",
    "parse_source_spec",
    "prompt_texts",
    "read_rows",
    "read_source",
    "split_eval",
    "tokenize_preferences",
]
