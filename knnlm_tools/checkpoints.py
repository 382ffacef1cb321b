"""
Checkpoints: the model, its vocabulary and a fingerprint of both, written atomically and read
as tensors and plain data only (a checkpoint that carries code is refused before it runs);
and load_model, which also takes a Hugging Face model (knnlm_tools/huggingface.py) where a
script takes --checkpoint.
"""
import hashlib
import json
import os
import pickle
import warnings
from dataclasses import asdict

import torch

import knnlm
from knnlm import KnnlmError
from knnlm_tools import huggingface
from knnlm_tools.files import atomic_write


def vocab_fingerprint(vocab):
    """A short hash of the vocabulary (a Hugging Face tokenizer: its whole definition)."""
    return hashlib.sha256((getattr(vocab, "identity", None) or "\n".join(vocab.itos)).encode()).hexdigest()[:16]


def fingerprint(model, vocab):
    """A short hash of the weights, the config and the vocabulary: what a datastore depends on
    (a Hugging Face model's is computed once, when it is loaded)."""
    if isinstance(model, huggingface.HuggingFaceLM):
        return model.known_fingerprint
    h = hashlib.sha256(json.dumps(asdict(model.cfg), sort_keys=True).encode())
    h.update("\n".join(vocab.itos).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path, model, vocab, **extra):
    with atomic_write(path) as tmp:
        try:
            torch.save({"config": asdict(model.cfg), "model": model.state_dict(), "vocab": vocab.itos,
                        "fingerprint": fingerprint(model, vocab), **extra}, tmp)
        except RuntimeError as e:  # torch's writer failed, e.g. on a full disk
            raise KnnlmError(f"cannot write {path}: {e}") from None


TORCH_HEADERS = (b"PK\x03\x04", b"\x80")  # torch.save writes a zip archive, or a pickle of protocol >= 2


def check_replaceable(path):
    """Refuse to write a checkpoint over a file that is not a torch file (TORCH_HEADERS): a slip such as
    --out DATASTORE/keys.npy would lose that file to the training run."""
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "rb") as f:
            head = f.read(4)
        if not head.startswith(TORCH_HEADERS):
            raise KnnlmError(f"{path} exists and is not a checkpoint (it begins with {head!r}): pass another --out, "
                             "or remove it")


# train.py arguments added since the first checkpoints, at the value those were trained with
TRAINED_BEFORE = {"precision": "float32"}


def training_args(ckpt):
    """The train.py arguments a checkpoint was trained with (None for one written without them, e.g. a
    converted model), those added since it was written at the value it trained with."""
    return {**TRAINED_BEFORE, **ckpt["args"]} if "args" in ckpt else None


CHECKPOINT_FIELDS = ("config", "model", "vocab", "fingerprint")


def load_model(spec, device="cpu", window=None):
    """--checkpoint: a checkpoint of train.py, or a Hugging Face causal LM (a directory written by
    save_pretrained, or a hub name) -> (model in eval mode, vocab, {"config", "fingerprint", ...}).
    Both models return logits and keys alike; window is a Hugging Face model's (default: its
    context, at most huggingface.DEFAULT_WINDOW), the project's models have their own."""
    if huggingface.is_huggingface(spec):
        return huggingface.load(spec, device, window)
    model, vocab, ckpt = load_checkpoint(spec, device)
    if window is not None and window != model.cfg.block_size:
        raise KnnlmError(f"--window is for Hugging Face models: {spec} has a fixed context of {model.cfg.block_size} tokens")
    return model, vocab, ckpt


def key_type(model, wanted):
    """The key a datastore of this model stores when `wanted` is asked for: a Hugging Face model
    without a feed-forward block found gives its final hidden state instead of the paper's key."""
    if isinstance(model, huggingface.HuggingFaceLM):
        if wanted not in huggingface.KEY_TYPES:
            raise KnnlmError(f"--key-type {wanted} is one of the project's own models; a Hugging Face model's keys are "
                             + ", ".join(huggingface.KEY_TYPES))
        return wanted if wanted in model.key_types else "final_hidden"
    return wanted


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, vocab, the whole checkpoint dict). Only tensors and plain data are
    read (torch.load's weights_only): a checkpoint is a pickle, and a pickle of any other object
    can run code as it is loaded; such a file is refused before anything in it runs."""
    if os.path.isdir(path):
        raise KnnlmError(f"{path} is a directory, not a checkpoint file of train.py")
    if not os.path.isfile(path):
        raise KnnlmError(f"no checkpoint at {path}: train one with train.py (or pass --checkpoint)")
    try:
        with warnings.catch_warnings():  # e.g. on the pickle protocol of a file that is refused anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # refused by weights_only, truncated, corrupt, or not a torch file at all
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:  # unreadable (its permissions): torch.load's own error, below, says so
            head = None
        if head == b"":
            raise KnnlmError(f"cannot read checkpoint {path}: the file is empty") from None
        if head is not None and not head.startswith(TORCH_HEADERS):
            raise KnnlmError(f"cannot read checkpoint {path}: not a file that torch.save writes (it begins with "
                             f"{head!r}, not with a zip archive's or a pickle's header)") from None
        if isinstance(e, pickle.UnpicklingError):  # what weights_only refuses: objects other than tensors and plain data
            detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
            raise KnnlmError(f"refused to load {path}: it holds Python objects other than tensors and plain data, "
                             f"which could run code when loaded ({detail or 'weights_only'}); train.py's checkpoints "
                             "hold none") from None
        raise KnnlmError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [f for f in CHECKPOINT_FIELDS if f not in ckpt] if isinstance(ckpt, dict) else CHECKPOINT_FIELDS
    if missing:
        raise KnnlmError(f"{path} is not a checkpoint of train.py: it has no {', '.join(missing)}")
    try:
        model = knnlm.TransformerLM(knnlm.ModelConfig(**ckpt["config"])).to(device)
        model.load_state_dict(ckpt["model"])
        vocab = knnlm.Vocab(ckpt["vocab"])
    except Exception as e:  # a config, weights or vocabulary of the wrong shape
        raise KnnlmError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if fingerprint(model, vocab) != ckpt["fingerprint"]:
        raise KnnlmError(f"checkpoint {path} is corrupt: its weights do not match its fingerprint")
    return model.eval(), vocab, ckpt
