#!/usr/bin/env python3
"""moeforge's Megatron indexed-dataset reader against Megatron-Core's own writer and reader.

1. Megatron's IndexedDatasetBuilder writes datasets in every token dtype, with several documents
   of several sequences and empty documents; `moeforge data-info --tokens-out` must return
   every token, every sequence length and the document index exactly.
2. launch/preprocess.py (a real BPE tokenizer trained here with the tokenizers library) writes
   a dataset that Megatron's IndexedDataset reads, whose documents decode back to the input
   text, and that moeforge reads token for token; a file that is not a tokenizer is refused.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
from safetensors.torch import load_file

warnings.filterwarnings("ignore")
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa

failures = []


def check(condition, message):
    print(("ok    " if condition else "FAIL  ") + message)
    if not condition:
        failures.append(message)


def moeforge_tokens(binary, prefix, out):
    result = subprocess.run([binary, "data-info", prefix, "--tokens-out", out],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"data-info {prefix} failed: {result.stderr}")
    return load_file(out)


def megatron_view(prefix):
    data = IndexedDataset(prefix)
    tokens = [np.asarray(data[i], dtype=np.int64) for i in range(len(data))]
    return (np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
            np.asarray(data.sequence_lengths, dtype=np.int64),
            np.asarray(data.document_indices, dtype=np.int64))


def builder_datasets(binary, work):
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16):
        info = np.iinfo(dtype)
        prefix = os.path.join(work, f"mc_{np.dtype(dtype).name}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for document in range(7):
            lengths = [int(n) for n in rng.integers(0, 40, size=rng.integers(1, 4))]
            if document == 3:
                lengths = [0]  # an empty document
            tokens = rng.integers(max(info.min, -1000), min(info.max, 60000) + 1, size=sum(lengths))
            builder.add_document(torch.from_numpy(tokens.astype(dtype)), lengths)
        builder.finalize(prefix + ".idx")
        ours = moeforge_tokens(binary, prefix, prefix + ".ours.safetensors")
        tokens, lengths, documents = megatron_view(prefix)
        check(np.array_equal(ours["tokens"].numpy(), tokens)
              and np.array_equal(ours["sequence_lengths"].numpy(), lengths)
              and np.array_equal(ours["document_index"].numpy(), documents),
              f"{np.dtype(dtype).name}: {len(tokens)} tokens, {len(lengths)} sequences, "
              f"{len(documents) - 1} documents identical to Megatron's reader")


def preprocess_round_trip(binary, source_dir, work):
    sys.path.insert(0, os.path.join(source_dir, "tests"))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = [f"Document {i}: the router sends token {i * 7} to expert {i % 5}, and the gate "
             f"balances load over {i + 2} experts." for i in range(50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(work, "tokenizer.json"))
    with open(os.path.join(work, "docs.jsonl"), "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    prefix = os.path.join(work, "pre")
    result = subprocess.run([sys.executable, os.path.join(source_dir, "launch", "preprocess.py"),
                             "--tokenizer", os.path.join(work, "tokenizer.json"), "--input",
                             os.path.join(work, "docs.jsonl"), "--output-prefix", prefix],
                            capture_output=True, text=True)
    check(result.returncode == 0 and "data.eod_token_id: 0" in result.stdout,
          f"preprocess.py runs and names the end-of-document id: {result.stdout.strip()}")
    data = IndexedDataset(prefix)
    decoded = [tok.decode([int(t) for t in data[i][:-1]]) for i in range(len(data))]
    check(decoded == texts and all(int(data[i][-1]) == 0 for i in range(len(data))),
          "preprocess -> Megatron's reader -> decode gives back every input text, each "
          "document ending in the end-of-document token")
    ours = moeforge_tokens(binary, prefix, prefix + ".ours.safetensors")
    tokens, lengths, _ = megatron_view(prefix)
    check(np.array_equal(ours["tokens"].numpy(), tokens) and
          np.array_equal(ours["sequence_lengths"].numpy(), lengths),
          "moeforge reads preprocess.py's output token for token")
    not_tokenizer = os.path.join(work, "not_a_tokenizer.json")
    with open(not_tokenizer, "w") as f:
        f.write('{"hello": "world"}')
    result = subprocess.run([sys.executable, os.path.join(source_dir, "launch", "preprocess.py"),
                             "--tokenizer", not_tokenizer, "--input",
                             os.path.join(work, "docs.jsonl"), "--output-prefix", prefix + "x"],
                            capture_output=True, text=True)
    check(result.returncode != 0 and "is not a tokenizer.json" in result.stderr,
          f"a file that is not a tokenizer is refused: {result.stderr.strip()}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--moeforge", required=True)
    parser.add_argument("--source-dir", required=True)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="moeforge-data-")
    builder_datasets(os.path.abspath(args.moeforge), work)
    preprocess_round_trip(os.path.abspath(args.moeforge), args.source_dir, work)
    shutil.rmtree(work)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
