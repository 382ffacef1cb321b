"""
The tools around the method of knnlm.py, one module per concern; the scripts import the ones they use.

    files         atomic writes, one writer at a time (OS locks), JSON, disk space, memory-mapped pages
    corpora       WikiText found, downloaded, checked; which text is which; is the evaluated text in a datastore
    huggingface   any transformers causal LM as the model (the paper's key by a forward hook), its tokenizer as the vocabulary
    gpt2          the project's model written as a transformers GPT-2 directory with a word-level tokenizer
    checkpoints   the model, its vocabulary and their fingerprint, saved and loaded (tensors and plain data only);
                  load_model: a checkpoint or a Hugging Face model
    manifests     what a datastore is (meta.json), its files' checksums and seal
    search        the C++/CUDA kernel and the one place that decides how a datastore is searched
    faiss_index   the FAISS index of a datastore on disk: built in shards, resumably; checked and searched
    datastores    datastores on disk: built resumably and in shards, loaded with checks
    cli           one-line errors, argument types, the flags the scripts share

Each imports only those above it in this list.
"""
