"""Unigram and bigram validation PPL of an experiment's own split: the floor any model must beat.

Reads the experiment's corpus and tokenizer exactly as `newllm-kit run` does (the run's cache
under --out is reused), then, for every training size, fits an add-one unigram and an add-k bigram
(k chosen on the validation stream from a small grid, so the bigram is, if anything, optimistic)
and scores every validation position 1 … n−1, as the recipes do.

    python benchmarks/ngram_ppl.py experiments/baselines.toml --out runs [--json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from newllm_kit.config import load_config
from newllm_kit.experiment import CorpusCache
from newllm_kit.plugins import load_plugins

K_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def unigram_ppl(train: torch.Tensor, val: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[val[1:]].mean()))


def bigram_ppl(train: torch.Tensor, val: torch.Tensor, vocab: int, k: float) -> float:
    pairs = torch.zeros(vocab * vocab, dtype=torch.float64)
    pairs.index_add_(0, train[:-1] * vocab + train[1:], torch.ones(train.numel() - 1, dtype=torch.float64))
    table = pairs.view(vocab, vocab) + k
    logp = (table / table.sum(1, keepdim=True)).log()
    return math.exp(-float(logp[val[:-1], val[1:]].mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="the --out of the run (its .cache is reused)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = load_config(args.file, load_plugins().registry)
    corpus = CorpusCache(config, args.out / ".cache")
    vocab, val = corpus.tokenizer.vocab_size, corpus.val.ids.long()
    rows = []
    for samples in sorted(config.schema.experiment.samples):
        train = corpus.train_ids(samples).long()
        bigrams = {k: bigram_ppl(train, val, vocab, k) for k in K_GRID}
        k = min(bigrams, key=lambda key: bigrams[key])
        rows.append({"samples": samples, "train_tokens": train.numel(), "val_tokens": val.numel(),
                     "unigram_ppl": unigram_ppl(train, val, vocab), "bigram_ppl": bigrams[k], "bigram_k": k})
    if args.json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['samples']:>6,} docs  {r['train_tokens']:>9,} tokens  unigram {r['unigram_ppl']:8.2f}  "
              f"bigram {r['bigram_ppl']:8.2f} (add-{r['bigram_k']})")


if __name__ == "__main__":
    main()
