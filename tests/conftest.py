"""Fixtures shared by the test modules."""
import os

import numpy as np
import pytest
import torch

# The scripts the tests start run on one thread: their numbers then do not depend on what the tests
# running beside them (pytest -n) keep busy, which cpu.Threads would count. This process's torch read
# its thread count when it loaded and keeps it.
os.environ["OMP_NUM_THREADS"] = "1"

import knnlm
from knnlm_tools import datastores
from helpers import WORDS, tiny_model, untrained_work


@pytest.fixture
def built(tmp_path):
    """A datastore built by a tiny model over a tiny text."""
    vocab = knnlm.Vocab([knnlm.EOS, knnlm.UNK] + WORDS[:18])
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, len(vocab), size=300))
    model = tiny_model(len(vocab))
    meta = datastores.build_datastore(model, vocab, tokens, str(tmp_path / "ds"), min_context=6, batch_size=4,
                                     progress=False)
    return model, vocab, tokens, datastores.DiskDatastore(str(tmp_path / "ds")), meta


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus, an (untrained) checkpoint and its datastore, as the scripts leave them: (root, corpus)."""
    return untrained_work(tmp_path_factory.mktemp("work"), (80, 15, 15))
