"""
Turn raw text files into a corpus in the WikiText format, for a datastore from another
domain (experiments/domain_adaptation.py, build_datastore.py --data):

    python -m experiments.to_wikitext FILE_OR_DIR ... --out data/mycorpus [--separator %]

Documents are the files, or the parts of a file between lines equal to --separator
(e.g. "%" in fortune files). Paragraphs are separated by blank lines. Each paragraph is
tokenised the Moses way by sacremoses, as WikiText was: punctuation split off, "don't"
-> "don 't", hyphens inside words -> " @-@ ", and (one rule of ours) the separators
inside numbers -> " @,@ " and " @.@ ", as in "1 @,@ 000 @.@ 5". Words are not
replaced by <unk> here: the model's vocabulary does that when the corpus is read.
The documents are shuffled (--seed) and split into wiki.{train,valid,test}.tokens.
"""
import argparse
import os
import random
import re

from sacremoses import MosesTokenizer
from tqdm import tqdm

import knnlm
from knnlm_tools import files, cli

NUMBER_SEPARATOR = re.compile(r"(?<=\d)([,.])(?=\d)")


def documents(paths, separator=None, skipped=None):
    """Yield each document of the files (directories: the regular files inside, sorted) as a list of paragraphs.
    A file named in paths must be UTF-8 text; one found in a directory that is not (e.g. a binary index beside
    the texts) is left out and appended to `skipped`."""
    texts = []
    for path in paths:
        if os.path.isdir(path):
            texts += sorted((os.path.join(path, f), True) for f in os.listdir(path)
                            if os.path.isfile(os.path.join(path, f)) and not os.path.islink(os.path.join(path, f)))
        elif os.path.isfile(path):
            texts.append((path, False))
        else:
            raise knnlm.KnnlmError(f"no such file or directory: {path}")
    for file, in_directory in texts:
        try:
            with open(file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            if not in_directory:
                raise knnlm.KnnlmError(f"{file} is not UTF-8 text ({e.reason}: byte 0x{e.object[e.start]:02x} at "
                                       f"{e.start:,}); convert it first, e.g. with iconv") from None
            if skipped is not None:
                skipped.append(file)
            continue
        parts = re.split(rf"^{re.escape(separator)}$", text, flags=re.M) if separator else [text]
        for part in parts:
            paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", part)]
            if any(paragraphs):
                yield [p for p in paragraphs if p]


def wikitext_line(paragraph, tokenizer):
    """One paragraph of raw text -> one WikiText line (leading space, tokens, trailing space)."""
    tokens = tokenizer.tokenize(paragraph, aggressive_dash_splits=True, escape=False, return_str=True)
    return " " + NUMBER_SEPARATOR.sub(r" @\1@ ", tokens) + " \n"


def convert(paths, out_dir, separator=None, valid=0.05, test=0.05, seed=0, lang="en"):
    """Write out_dir/wiki.{train,valid,test}.tokens; -> {split: number of documents}."""
    outputs = {os.path.realpath(out_dir)} | {os.path.realpath(knnlm.split_path(out_dir, s)) for s in knnlm.SPLITS}
    if any(os.path.realpath(path) in outputs for path in paths):  # a rerun would read the splits as raw text
        raise knnlm.KnnlmError(f"--out {out_dir} is among the raw texts: the next run would read its "
                               "wiki.*.tokens as documents, and test's text could land in train. Pass another --out")
    skipped = []
    docs = list(documents(paths, separator, skipped))
    if skipped:
        print(f"left out {len(skipped)} file{'s' if len(skipped) > 1 else ''} that {'are' if len(skipped) > 1 else 'is'} "
              f"not UTF-8 text: {', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''}")
    if len(docs) < 3:
        raise knnlm.KnnlmError(f"found {len(docs)} documents in {' '.join(paths)}: a train, valid and test split "
                               "need at least 3 (is --separator right?)")
    random.Random(seed).shuffle(docs)
    n_valid, n_test = max(1, round(valid * len(docs))), max(1, round(test * len(docs)))
    splits = {"valid": docs[:n_valid], "test": docs[n_valid:n_valid + n_test], "train": docs[n_valid + n_test:]}
    tokenizer = MosesTokenizer(lang=lang)
    os.makedirs(out_dir, exist_ok=True)
    for split, split_docs in splits.items():
        with files.atomic_write(knnlm.split_path(out_dir, split)) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for doc in tqdm(split_docs, desc=f"{split} (tokenising)", unit="doc"):
                f.write(" \n")  # WikiText: a blank line before each article
                f.writelines(wikitext_line(p, tokenizer) for p in doc)
    return {split: len(split_docs) for split, split_docs in splits.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="raw text files, or directories of them")
    parser.add_argument("--out", required=True, help="directory for wiki.{train,valid,test}.tokens")
    parser.add_argument("--separator", default=None, help="a line equal to this separates documents within a file")
    parser.add_argument("--valid", type=float, default=0.05, help="fraction of documents for valid (default: %(default)s)")
    parser.add_argument("--test", type=float, default=0.05, help="fraction of documents for test (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the documents (default: %(default)s)")
    parser.add_argument("--lang", default="en", help="language of the Moses tokeniser (default: %(default)s)")
    args = parser.parse_args()
    if not (0 < args.valid < 1 and 0 < args.test < 1 and args.valid + args.test < 1):
        parser.error("--valid and --test must be fractions in (0, 1) with room left for train")
    with cli.user_errors():
        counts = convert(args.paths, args.out, args.separator, args.valid, args.test, args.seed, args.lang)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n:,} documents" for split, n in counts.items()))
