"""
Checkpoints: the model, its vocabulary and a fingerprint of both, written atomically and read
as tensors and plain data only (a checkpoint that carries code is refused before it runs).
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
from knnlm_tools.files import atomic_write


def vocab_fingerprint(vocab):
    return hashlib.sha256("\n".join(vocab.itos).encode()).hexdigest()[:16]


def fingerprint(model, vocab):
    """A short hash of the weights, the config and the vocabulary: what a datastore depends on."""
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


CHECKPOINT_FIELDS = ("config", "model", "vocab", "fingerprint")


def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode, vocab, the whole checkpoint dict). Only tensors and plain data are
    read (torch.load's weights_only): a checkpoint is a pickle, and a pickle of any other object
    can run code as it is loaded; such a file is refused before anything in it runs."""
    if not os.path.isfile(path):
        raise KnnlmError(f"no checkpoint at {path}: train one with train.py (or pass --checkpoint)")
    try:
        with warnings.catch_warnings():  # e.g. on the pickle protocol of a file that is refused anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: objects other than tensors and plain data
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise KnnlmError(f"refused to load {path}: it holds Python objects other than tensors and plain data, "
                         f"which could run code when loaded ({detail or 'weights_only'}); train.py's checkpoints "
                         "hold none") from None
    except Exception as e:  # truncated, corrupt, or not a torch file
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
