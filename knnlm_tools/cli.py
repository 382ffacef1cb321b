"""
What the scripts share: one-line errors (and Ctrl-C) for the user, argparse types that refuse bad
numbers, and the flags the scripts and the analyses have in common.
"""
import argparse
import math
import sys
from contextlib import contextmanager

import torch

from knnlm import KnnlmError
from knnlm_tools.search import EXACT_MAX_KEYS
from knnlm_tools.faiss_index import NPROBE
from knnlm_tools.cpu import PRECISIONS


for _stream in (sys.stdout, sys.stderr):  # the scripts print λ, ¶, …: on a console that cannot, as \u escapes
    if hasattr(_stream, "reconfigure"):
        _stream.reconfigure(errors="backslashreplace")


@contextmanager
def user_errors(interrupted=None):
    """Around a script's work on user input: a KnnlmError ends it with one line and exit code 2;
    with interrupted (what to do about it), Ctrl-C ends it with that line and exit code 130."""
    try:
        yield
    except KnnlmError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)


def positive_int(text, low=1, what="a positive integer"):
    """argparse type: an integer of at least 1 (a batch size, a count of steps or shards)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an integer of at least 0 (a count of warm-up steps)."""
    return positive_int(text, 0, "an integer >= 0")


def check_device(device):
    """--device: cpu, cuda or cuda:N, and there."""
    try:
        kind = torch.device(device)
    except RuntimeError:
        kind = None
    if kind is None or kind.type not in ("cpu", "cuda"):
        raise KnnlmError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind.type == "cuda" and not torch.cuda.is_available():
        raise KnnlmError(f"--device {device} was asked for, but this torch build sees no CUDA GPU: use --device cpu")
    if kind.type == "cuda" and (kind.index or 0) >= torch.cuda.device_count():
        raise KnnlmError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def finite_float(low=None, high=None, low_open=False, high_open=False):
    """argparse type: a finite number in [low, high] (an end open where said), e.g. a rate or a weight."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            where = (f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
                     f"{'inf' if high is None else high}{')' if high_open or high is None else ']'}")
            raise argparse.ArgumentTypeError(f"must be a finite number in {where}, got {text}")
        return value
    return parse


ARGUMENTS = {  # the flags the scripts and experiments share: name -> (flag, its add_argument options)
    "data": ("--data", dict(default="data/wikitext-103-small",
                            help="directory with wiki.{train,valid,test}.tokens; a missing wikitext-103, wikitext-2 "
                                 "or wikitext-103-small directory is downloaded (default: %(default)s)")),
    "checkpoint": ("--checkpoint", dict(default="runs/model.pt",
                                        help="model from train.py, or a Hugging Face causal LM: a directory written by "
                                             "save_pretrained (export.py writes the project's) or a hub name such as "
                                             "gpt2 (default: %(default)s)")),
    "window": ("--window", dict(type=positive_int, default=None,
                                help="a Hugging Face model's window in tokens (default: its context, at most "
                                     "1024); the project's models have their own")),
    "datastore": ("--datastore", dict(default="runs/datastore",
                                      help="datastore from build_datastore.py, from this corpus or another "
                                           "(default: %(default)s)")),
    "k": ("--k", dict(type=positive_int, default=1024, help="neighbours per token (default: %(default)s, the paper's)")),
    "min_context": ("--min-context", dict(type=int, default=None,
                                          help="every token has at least this many tokens of left context "
                                               "(default: half the model's context, like the paper's 1536 of 3072)")),
    "batch_size": ("--batch-size", dict(type=positive_int, default=16, help="windows per forward pass (default: %(default)s)")),
    "device": ("--device", dict(default="cuda" if torch.cuda.is_available() else "cpu",
                                help="cpu or cuda (default: cuda when present)")),
    "lambda": ("--lambda", dict(dest="lmbda", type=float, default=0.25,
                                help="interpolation weight of p_kNN (default: %(default)s, the paper's in-domain value)")),
    "temperature": ("--temperature", dict(type=float, default=1.0,
                                          help="p_kNN ∝ exp(-d / temperature) (default: %(default)s, as in the paper)")),
    "precision": ("--precision", dict(default="auto", choices=PRECISIONS,
                                      help="the forward passes' arithmetic: bfloat16 autocast or float32; auto: "
                                           "bfloat16 on a CPU with bfloat16 instructions (AVX512-BF16 or AMX, as "
                                           "torch detects them, unless ATEN_CPU_CAPABILITY holds torch at AVX2), float32 "
                                           "elsewhere; build_datastore.py continues a datastore in the precision it was "
                                           "begun in (default: %(default)s)")),
    "nprobe": ("--nprobe", dict(type=int, default=None,
                                help=f"faiss: inverted lists visited per query (default: the paper's {NPROBE}, or all "
                                     "lists when the index has fewer)")),
}


def check_knnlm_arguments(parser, args):
    """The flags of eqs. 2 and 3 (--lambda, --temperature) in range, or the parser's one-line error
    (--k is a positive_int)."""
    if not 0 <= args.lmbda <= 1:
        parser.error(f"--lambda must be in [0, 1], got {args.lmbda}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")


def arguments(*names, **defaults):
    """A parent parser (argparse's parents=[...]) with the shared flags named, defaults overridden by name."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in names:
        flag, options = ARGUMENTS[name]
        parser.add_argument(flag, **{**options, **({"default": defaults[name]} if name in defaults else {})})
    return parser


def backend_argument(parser, choices=("auto", "torch", "ext", "faiss")):
    meaning = {"torch": "exact, chunked matmul + top-k in PyTorch", "ext": "exact, the C++ kernel of csrc/",
               "faiss": "the datastore's IVF-PQ index (build_datastore.py --index)",
               "auto": (f"faiss beyond {EXACT_MAX_KEYS:,} keys when the index exists, else " if "faiss" in choices
                        else "") + "ext when built, else torch"}
    parser.add_argument("--backend", default="auto", choices=choices,
                        help="nearest-neighbour search: " + "; ".join(f"{c} = {meaning[c]}" for c in choices[1:] + choices[:1])
                             + " (default: %(default)s)")
