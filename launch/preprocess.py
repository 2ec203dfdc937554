#!/usr/bin/env python3
"""Tokenize text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for data.source: megatron.

  .venv/bin/python launch/preprocess.py --tokenizer TOKENIZER --input FILE [FILE ...] \\
      --output-prefix data/corpus [--json-key text] [--eod-token "<|endoftext|>"]

TOKENIZER is a Hugging Face tokenizer.json, or a model directory holding one (its
tokenizer_config.json then names the end-of-document token). Inputs: .jsonl files (one JSON
object per line, the text under --json-key) or plain text files (one document per file, or per
blank-line-separated paragraph with --split-paragraphs). Every document gets the
end-of-document token appended. Tokens are stored as uint16 when the vocabulary fits, int32
otherwise, in Megatron's format (megatron/core/datasets/indexed_dataset.py, version 1, one
sequence per document). Encoding runs in batches through the tokenizers library (Rust, all
cores). Prints the end-of-document id (set it as data.eod_token_id) and tokens/s.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint16: 8, np.int32: 4}


def load_tokenizer(path):
    from tokenizers import Tokenizer
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        return Tokenizer.from_file(file), file
    except Exception as error:  # the tokenizers library raises plain Exceptions
        raise SystemExit(f"preprocess: {file} is not a tokenizer.json: {error}")


def end_of_document_id(tokenizer, tokenizer_path, requested):
    candidates = [requested] if requested else []
    config = os.path.join(os.path.dirname(tokenizer_path), "tokenizer_config.json")
    if not requested and os.path.exists(config):
        with open(config) as f:
            eos = json.load(f).get("eos_token")
        candidates.append(eos["content"] if isinstance(eos, dict) else eos)
    candidates += [] if requested else ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
    for token in candidates:
        if token and tokenizer.token_to_id(token) is not None:
            return token, tokenizer.token_to_id(token)
    raise SystemExit(f"preprocess: no end-of-document token among {candidates} in "
                     f"{tokenizer_path}; name one with --eod-token")


def documents(paths, json_key, split_paragraphs):
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[json_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise SystemExit(f"preprocess: {path}:{number}: no '{json_key}' text "
                                         f"({error})")
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            if split_paragraphs:
                yield from (p for p in text.split("\n\n") if p.strip())
            else:
                yield text


def write_index(path, dtype, lengths):
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        pointers[1:] = np.cumsum(lengths[:-1], dtype=np.int64) * np.dtype(dtype).itemsize
    document_index = np.arange(len(lengths) + 1, dtype=np.int64)  # one sequence per document
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", DTYPE_CODES[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(document_index)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(document_index.tobytes(order="C"))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--eod-token")
    parser.add_argument("--split-paragraphs", action="store_true")
    parser.add_argument("--batch", type=int, default=1000, help="documents per encode batch")
    args = parser.parse_args()
    tokenizer, tokenizer_path = load_tokenizer(args.tokenizer)
    eod_token, eod = end_of_document_id(tokenizer, tokenizer_path, args.eod_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 65536 else np.int32
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    lengths, tokens_total, start = [], 0, time.perf_counter()
    with open(args.output_prefix + ".bin", "wb") as bin_file:
        batch = []

        def flush():
            nonlocal tokens_total
            for encoding in tokenizer.encode_batch(batch, add_special_tokens=False):
                ids = np.asarray(encoding.ids + [eod], dtype=dtype)
                bin_file.write(ids.tobytes(order="C"))
                lengths.append(len(ids))
                tokens_total += len(ids)
            batch.clear()
            rate = tokens_total / max(time.perf_counter() - start, 1e-9)
            print(f"\rpreprocess: {len(lengths)} documents, {tokens_total} tokens, "
                  f"{rate:,.0f} tokens/s", end="", file=sys.stderr, flush=True)

        for text in documents(args.input, args.json_key, args.split_paragraphs):
            batch.append(text)
            if len(batch) >= args.batch:
                flush()
        if batch:
            flush()
    print(file=sys.stderr)
    if not lengths:
        raise SystemExit("preprocess: the inputs hold no documents")
    write_index(args.output_prefix + ".idx", dtype, lengths)
    seconds = time.perf_counter() - start
    print(f"{args.output_prefix}: {len(lengths)} documents, {tokens_total} tokens "
          f"({np.dtype(dtype).name}, vocabulary {vocab}), {tokens_total / seconds:,.0f} tokens/s; "
          f"end of document '{eod_token}' = id {eod} (data.eod_token_id: {eod})")


if __name__ == "__main__":
    main()
