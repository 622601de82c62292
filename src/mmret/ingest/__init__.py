"""Reading collections: image decoding and item sources (folders, JSONL, CSV, Parquet)."""
