"""File suffixes the pipeline reads: the format of each, and the compressions around them.

Shared by the source listing (``pipeline.sources``) and the default dataset name
(``pipeline.naming``, which strips them), so both know the same suffixes.
"""

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".rst": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
