"""
The project's TransformerLM as a `transformers` GPT-2 model directory (export.py): it is GPT-2's
architecture (pre-LayerNorm blocks, GELU, learned positions, tied input and output embeddings),
so its weights only change names; its vocabulary becomes a word-level tokenizer (the `tokenizers`
library) that reads WikiText lines, as huggingface.line_text gives them, into the same token ids.
"""
import os
import shutil

import torch.nn as nn

import knnlm
from knnlm import KnnlmError
from knnlm_tools.huggingface import quiet


def gpt2_state_dict(model):
    """TransformerLM's weights under GPT-2's names (GPT-2's Conv1D stores a Linear's weight transposed)."""
    state = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
             "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": model.ln_f.bias}
    for i, block in enumerate(model.blocks):
        ours = {"ln_1": block.ln_1, "attn.c_attn": block.attn.qkv, "attn.c_proj": block.attn.proj,
                "ln_2": block.ln_2, "mlp.c_fc": block.mlp.fc, "mlp.c_proj": block.mlp.proj}
        for name, module in ours.items():
            linear = isinstance(module, nn.Linear)
            state[f"transformer.h.{i}.{name}.weight"] = module.weight.T if linear else module.weight
            state[f"transformer.h.{i}.{name}.bias"] = module.bias
    return {name: t.detach().contiguous() for name, t in state.items()}


def word_level_tokenizer(vocab, block_size):
    """The project's vocabulary as a transformers tokenizer: words split on whitespace, unknown ones
    <unk>, and the newline that ends a line (line_text) is <eos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.WordLevel(vocab.stoi, unk_token=knnlm.UNK))
    tokenizer.normalizer = normalizers.Replace("\n", f" {knnlm.EOS} ")
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=knnlm.UNK, eos_token=knnlm.EOS,
                                   model_max_length=block_size)


def export_gpt2(model, vocab, out):
    """Write a TransformerLM and its vocabulary as a transformers GPT-2 model directory (save_pretrained's
    files, a tokenizer among them), whole or not at all."""
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg, eos = model.cfg, vocab.stoi[knnlm.EOS]
    config = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, activation_function="gelu", layer_norm_epsilon=model.ln_f.eps,
                        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True, architectures=["GPT2LMHeadModel"])
    with quiet():
        hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(model), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to wte
        raise KnnlmError(f"the GPT-2 export does not fit: missing {missing}, unexpected {unexpected}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise KnnlmError(f"{out} already exists: choose another --out, or remove it first")
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        with quiet():
            hf.save_pretrained(tmp)
            word_level_tokenizer(vocab, cfg.block_size).save_pretrained(tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return hf
