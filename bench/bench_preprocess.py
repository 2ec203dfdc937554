#!/usr/bin/env python3
"""Preprocessing throughput: launch/preprocess.py end to end (read, encode, write .bin/.idx)
beside the tokenizers library's own batch encoding of the same documents, in one run.

  .venv/bin/python bench/bench_preprocess.py [--copies 40]

Corpus: the English license texts of /usr/share/common-licenses, repeated --copies times, as
JSONL documents (one per paragraph); tokenizer: a 2048-token BPE trained on them.
"""
import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from tokenizers import Tokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="moeforge-bench-pre-")
    files = sorted(f for f in glob.glob("/usr/share/common-licenses/*") if os.path.isfile(f))
    subprocess.run([sys.executable, os.path.join(root, "launch", "train_tokenizer.py"),
                    "--input", *files, "--output", os.path.join(work, "tokenizer.json")],
                   check=True, capture_output=True)
    paragraphs = [p for f in files for p in open(f, errors="replace").read().split("\n\n")
                  if p.strip()]
    docs = paragraphs * args.copies
    with open(os.path.join(work, "docs.jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tokenizer = Tokenizer.from_file(os.path.join(work, "tokenizer.json"))
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(docs, add_special_tokens=False))
    encode = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(root, "launch", "preprocess.py"), "--tokenizer",
                    os.path.join(work, "tokenizer.json"), "--input",
                    os.path.join(work, "docs.jsonl"), "--output-prefix",
                    os.path.join(work, "corpus")], check=True, capture_output=True)
    end_to_end = (tokens + len(docs)) / (time.perf_counter() - start)  # + one EOD per document
    print(f"{len(docs)} documents, {tokens} tokens, {os.cpu_count()} cores")
    print(f"  tokenizers encode_batch alone   {encode:12,.0f} tokens/s")
    print(f"  launch/preprocess.py end to end {end_to_end:12,.0f} tokens/s "
          f"({end_to_end / encode:.2f} of encode_batch; includes interpreter start, JSON, writes)")


if __name__ == "__main__":
    main()
