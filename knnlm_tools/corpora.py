"""
Corpora: WikiText found, downloaded or cut to wikitext-103-small and checked; which text is which
(the token stream's hash); and whether a datastore's text holds the text being evaluated.
"""
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile

from tqdm import tqdm

import knnlm
from knnlm import KnnlmError
from knnlm_tools import files


WIKITEXT_URLS = {  # the official archives, newest location first
    "wikitext-103": ["https://wikitext.smerity.com/wikitext-103-v1.zip",
                     "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"],
    "wikitext-2": ["https://wikitext.smerity.com/wikitext-2-v1.zip",
                   "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"],
}
SMALL_TRAIN_BYTES = int(2.5 * 2**20)  # wikitext-103-small: the first 2.5 MiB of train


def check_corpus(data_dir):
    """Fail early, with one clear line, unless data_dir holds the three WikiText splits."""
    missing = [knnlm.split_path(data_dir, s) for s in knnlm.SPLITS if not os.path.isfile(knnlm.split_path(data_dir, s))]
    if missing:
        raise KnnlmError(f"{data_dir} is not a WikiText corpus directory: missing " + ", ".join(missing))
    empty = [knnlm.split_path(data_dir, s) for s in knnlm.SPLITS if os.path.getsize(knnlm.split_path(data_dir, s)) == 0]
    if empty:
        raise KnnlmError("empty corpus file: " + ", ".join(empty))
    return data_dir


def check_has_words(tokens, path, what):
    """tokens, unless the text they were read from has no word at all (only blank lines)."""
    if not any(knnlm.read_lines(path)):
        raise KnnlmError(f"{path} has no words, only blank lines: nothing to {what}")
    return tokens


def file_fingerprint(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def download_wikitext(name, root):
    """Download and unpack an official WikiText archive into root/name; returns that directory."""
    target = os.path.join(root, name)
    os.makedirs(root, exist_ok=True)
    errors = []
    for url in WIKITEXT_URLS[name]:
        try:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                archive = os.path.join(tmp, "archive.zip")
                with tqdm(unit="B", unit_scale=True, desc=f"download {name}") as bar:
                    def hook(blocks, block_size, total):
                        bar.total = total if total > 0 else None
                        bar.update(blocks * block_size - bar.n)
                    urllib.request.urlretrieve(url, archive, reporthook=hook)
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp)
                os.replace(os.path.join(tmp, name), target)  # the archive unpacks to <name>/
            return check_corpus(target)
        except OSError as e:
            errors.append(f"{url}: {e}")
    raise KnnlmError(f"could not download {name} (no internet?). Tried:\n  " + "\n  ".join(errors)
                     + "\nPut wiki.{train,valid,test}.tokens in a directory and pass it with --data.")


def make_small(src_dir, dst_dir, train_bytes=SMALL_TRAIN_BYTES):
    """wikitext-103-small: official valid and test; train cut to its first articles
    (the longest prefix of at most train_bytes that ends where an article begins). Written
    beside dst_dir and renamed into place: an interrupted cut leaves no dst_dir to be read later."""
    with open(knnlm.split_path(src_dir, "train"), "rb") as f:
        head = f.read(train_bytes + 1)
    lines = head.splitlines(keepends=True)
    cut, size = 0, 0
    for i, line in enumerate(lines[:-1]):  # an article starts with " \n" then " = Title = \n"
        if line == b" \n" and lines[i + 1].startswith(b" = ") and not lines[i + 1].startswith(b" = = "):
            if size <= train_bytes:
                cut = size
        size += len(line)
    root = os.path.dirname(os.path.normpath(dst_dir)) or "."
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        small = os.path.join(tmp, "small")
        os.makedirs(small)
        for split in ("valid", "test"):
            shutil.copyfile(knnlm.split_path(src_dir, split), knnlm.split_path(small, split))
        with open(knnlm.split_path(small, "train"), "wb") as f:
            f.write(head[:cut] if len(head) > train_bytes else head)
        check_corpus(small)
        os.replace(small, dst_dir)
    return dst_dir


def resolve_corpus(data_dir):
    """A directory with the three splits is used as it is. A missing directory named
    wikitext-103, wikitext-2 or wikitext-103-small is downloaded (and cut) first, by one
    process at a time: a second one started meanwhile is told which process is fetching it."""
    if os.path.isdir(data_dir):
        return check_corpus(data_dir)
    root, name = os.path.split(os.path.normpath(data_dir))
    if name not in WIKITEXT_URLS and name != "wikitext-103-small":
        return check_corpus(data_dir)
    with files.writing(data_dir):
        if os.path.isdir(data_dir):  # fetched by the process that held the lock before
            return check_corpus(data_dir)
        if name in WIKITEXT_URLS:
            return download_wikitext(name, root or ".")
        return make_small(resolve_corpus(os.path.join(root or ".", "wikitext-103")), data_dir)


SHARED_MIN_WORDS = 10    # paragraphs this long are (nearly) never in two WikiText splits: 0.005% of test's words
SHARED_MAX_SHARE = 0.1   # a datastore whose source holds more of an evaluated text's words is refused


def check_not_built_from(datastore, paths):
    """Refuse to evaluate text a datastore was built from: each token would find its own context at
    distance ~0 among the neighbours, and the perplexity would mean nothing. Caught: the same text,
    however its bytes differ (other line ends, a byte-order mark, other spaces: the token streams'
    hashes are compared); and, while the datastore's source file is there unchanged, a source that
    holds the text's paragraphs (more than SHARED_MAX_SHARE of its words in paragraphs of
    SHARED_MIN_WORDS words or more found verbatim there: train + test in one file, or half of test)."""
    source, paths = datastore.meta.source or {}, list(paths)
    advice = ("every token would find itself among its neighbours and the perplexity would mean nothing. Build it "
              "from another text, or pass --allow-eval-split-datastore to do it anyway")
    for path in paths:
        same = (source.get("tokens_sha256") == text_fingerprint(path) if "tokens_sha256" in source
                else source.get("sha256") == file_fingerprint(path))  # a datastore built before tokens_sha256
        if same:
            raise KnnlmError(f"the datastore {datastore.path} was built from {path}, the text being evaluated: {advice}")
    if not source.get("file"):
        return
    if not os.path.isfile(source["file"]) or file_fingerprint(source["file"]) != source.get("sha256"):
        print(f"note: {source['file']}, the datastore's source, is missing or changed: whether it holds the "
              "text being evaluated is not checked", file=sys.stderr)
        return
    for path, share in shared_paragraphs(paths, source["file"]).items():
        if share > SHARED_MAX_SHARE:
            raise KnnlmError(f"the datastore {datastore.path} was built from {source['file']}, which holds {share:.0%} "
                             f"of the words of {path}, the text being evaluated (its paragraphs, verbatim): {advice}")


def text_fingerprint(path):
    """A short sha256 of the token stream a reader sees in a WikiText file (knnlm.read_lines): the
    same for a copy with other line ends, a byte-order mark or other spaces."""
    h = hashlib.sha256()
    for words in knnlm.read_lines(path):
        h.update(" ".join(words).encode() + b"\n")
    return h.hexdigest()[:16]


def shared_paragraphs(paths, source_file, min_words=SHARED_MIN_WORDS):
    """{path: the share of its words, in paragraphs of min_words or more, whose paragraph is also in source_file}."""
    texts = {path: [" ".join(words) for words in knnlm.read_lines(path) if len(words) >= min_words] for path in paths}
    wanted, found = set().union(*texts.values()), set()
    for words in knnlm.read_lines(source_file, desc="is the evaluated text in the datastore's?"):
        if len(words) >= min_words and (line := " ".join(words)) in wanted:
            found.add(line)
    share = {}
    for path, lines in texts.items():
        words = [line.count(" ") + 1 for line in lines]
        share[path] = sum(n for n, line in zip(words, lines) if line in found) / max(1, sum(words))
    return share
