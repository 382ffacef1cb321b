"""Fixtures shared by the test modules."""
import numpy as np
import pytest
import torch

import knnlm
from knnlm_tools import checkpoints, datastores
from helpers import WORDS, run, tiny_model, write_corpus


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
    root = tmp_path_factory.mktemp("work")
    data = write_corpus(root / "corpus", n_lines=(80, 15, 15))
    vocab = knnlm.Vocab.build(knnlm.split_path(data, "train"))
    checkpoints.save_checkpoint(str(root / "runs" / "model.pt"), tiny_model(len(vocab)), vocab)
    run("build_datastore.py", "--data", data, cwd=root)
    return root, data
