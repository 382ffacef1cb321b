"""
Search: the C++/CUDA kernel of csrc/ (torch.ops.knnlm) and the one place that decides how a
datastore is searched: exactly (the PyTorch reference of knnlm.py, or the kernel) or by its FAISS index.
"""
import torch

import knnlm
from knnlm import KnnlmError


try:  # the C++/CUDA search kernel of csrc/, built by `pip install --no-build-isolation -e .`
    import knnlm_ext
except ImportError:
    knnlm_ext = None


SEARCH_BACKENDS = ("auto", "torch", "ext", "faiss")
EXACT_MAX_KEYS = 2_000_000    # beyond this, backend "auto" uses the FAISS index when there is one


def kernel_built():
    """Whether the C++ kernel of csrc/ is built (imported as knnlm_ext)."""
    return knnlm_ext is not None


def search_backend(backend, queries_device, keys_device, k, n_keys=0, has_index=False):
    """What a search will use: "faiss" (the index) when asked, or for "auto" beyond EXACT_MAX_KEYS keys
    when there is an index; else "ext" (the kernel) when asked, or for "auto" when it is built for
    these devices; else "torch"."""
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(SEARCH_BACKENDS)}, got {backend!r}")
    if backend == "faiss" or (backend == "auto" and n_keys > EXACT_MAX_KEYS and has_index):
        return "faiss"
    if backend == "ext" and knnlm_ext is None:
        raise KnnlmError("the C++ search kernel is not built: run `pip install --no-build-isolation -e .` "
                         "or use the torch backend")
    if backend != "auto":
        return backend
    queries_device, keys_device = torch.device(queries_device), torch.device(keys_device)
    usable = knnlm_ext is not None and queries_device == keys_device and (queries_device.type == "cpu" or (
        queries_device.type == "cuda" and knnlm_ext.cuda and k <= knnlm_ext.CUDA_MAX_K))
    return "ext" if usable else "torch"


def topk_l2(queries, keys, k, key_norms=None, backend="auto"):
    """knnlm.topk_l2 by the backend search_backend picks: the PyTorch reference or the kernel."""
    key_norms = knnlm.squared_norms(keys) if key_norms is None else key_norms
    if search_backend(backend, queries.device, keys.device, k) == "ext":
        return kernel_topk_l2(queries, keys, k, key_norms)
    return knnlm.topk_l2(queries, keys, k, key_norms)


def kernel_topk_l2(queries, keys, k, key_norms):
    """knnlm.topk_l2 by the C++/CUDA kernel (torch.ops.knnlm.topk_l2)."""
    knnlm.check_search_inputs(queries, keys, k, key_norms)
    if not queries.device == keys.device == key_norms.device:
        raise ValueError(f"queries, keys and key_norms must be on one device for the kernel, got "
                         f"{queries.device}, {keys.device}, {key_norms.device}")
    return torch.ops.knnlm.topk_l2(queries, keys, k, key_norms)


def rerank(queries, keys, ids, fd=-1, offset=0):
    """knnlm.rerank, by the kernel when it is built (reading the rows from the open file fd, where
    the keys start at byte offset, when fd >= 0)."""
    if knnlm_ext is not None and keys.device.type == "cpu":
        return torch.ops.knnlm.rerank_l2(queries, keys, ids, fd, offset)
    return knnlm.rerank(queries, keys, ids)
