#!/usr/bin/env python3
"""Train a byte-level BPE tokenizer (the tokenizers library) on text files and save it as a
Hugging Face tokenizer.json with an end-of-document token <|endoftext|> (id 0).

  .venv/bin/python launch/train_tokenizer.py --input FILE [FILE ...] --vocab-size 2048 \\
      --output runs/bpe/tokenizer.json
"""
import argparse
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(args.input, trainers.BpeTrainer(
        vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tokenizer.save(args.output)
    print(f"{args.output}: {tokenizer.get_vocab_size()} tokens, <|endoftext|> = "
          f"{tokenizer.token_to_id('<|endoftext|>')}")


if __name__ == "__main__":
    main()
