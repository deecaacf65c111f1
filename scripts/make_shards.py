#!/usr/bin/env python
"""Write a dataset (or a subset) as local shard-00000.jsonl.gz ... files + manifest.json, for offline machines.

    python scripts/make_shards.py HuggingFaceFW/fineweb-edu data/fineweb --name sample-10BT --max-rows 200000
    python scripts/make_shards.py data/tiny_corpus.jsonl data/distill/pretrain --split 'train[:1100]' --no-streaming
    python scripts/make_shards.py data/tiny_chat.jsonl out/chat --text-field none     # rows kept whole (stage 2)

SOURCE is an HF datasets id or local .jsonl / .jsonl.gz / .json / .parquet / .csv / .txt files (a file, a
directory or a glob), read through datasets.load_dataset. The output directory is what WindowStream and
distill.py read as data_path. Shards are written to .tmp files and renamed, and the manifest lists only
finished shards, so an interrupted run leaves nothing truncated. Library: trainkit.shard_writer.write_shards.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="HF datasets id, or local JSONL/JSONL.gz/parquet/CSV file, directory or glob")
    parser.add_argument("out_dir", help="output directory (shard-*.jsonl.gz + manifest.json)")
    parser.add_argument("--split", default="train", help="split; slices like 'train[:1000]' need --no-streaming (default: train)")
    parser.add_argument("--name", default=None, help="dataset config name, e.g. sample-10BT")
    parser.add_argument("--text-field", default="text",
                        help="field holding the text, written as `text`; 'none' keeps rows whole (messages, prompt/response)")
    parser.add_argument("--max-rows", type=int, default=None, help="stop after this many rows")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop once this many tokens are written (needs --tokenizer)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer for --max-tokens: a local path or hub id, or 'byte' for the built-in byte-level one")
    parser.add_argument("--rows-per-shard", type=int, default=10000, help="rows per shard file (default: 10000)")
    parser.add_argument("--no-streaming", action="store_true", help="download/prepare the split whole instead of streaming it")
    parser.add_argument("--cache-dir", default=None, help="HF datasets cache directory")
    parser.add_argument("--offline", action="store_true", help="use only the local datasets cache (as HF_DATASETS_OFFLINE=1)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in out_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def load_tokenizer_arg(value: str, offline: bool):
    from trainkit.tokenizer import build_byte_level_tokenizer

    if value == "byte":
        return build_byte_level_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(value, local_files_only=offline)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from trainkit.shard_writer import write_shards

    if args.max_tokens is not None and not args.tokenizer:
        print("make_shards: error: --max-tokens needs --tokenizer", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer_arg(args.tokenizer, args.offline) if args.tokenizer else None
        manifest = write_shards(
            args.source, args.out_dir, split=args.split, name=args.name,
            text_field=None if args.text_field.lower() in ("none", "") else args.text_field,
            max_rows=args.max_rows, max_tokens=args.max_tokens, tokenizer=tokenizer, rows_per_shard=args.rows_per_shard,
            streaming=not args.no_streaming, cache_dir=args.cache_dir, local_files_only=args.offline,
            overwrite=args.overwrite, progress=not args.quiet)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    size = sum(s["bytes"] for s in manifest["shards"])
    tokens = f", {manifest['tokens']:,} tokens" if manifest.get("tokens") is not None else ""
    print(f"wrote {manifest['rows']:,} rows{tokens} in {len(manifest['shards'])} shard(s) ({size / 1024:.1f} KiB) "
          f"to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
