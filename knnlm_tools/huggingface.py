"""
Hugging Face models: any causal LM of `transformers` as kNN-LM's model (a model that returns logits
and keys, like knnlm.TransformerLM), and its tokenizer as the vocabulary. (knnlm_tools/gpt2.py
writes the project's own model as one.)

The key. The paper's best key (Table 5) is the input of the last layer's feed-forward block,
after its LayerNorm. It is taken by a forward hook on that block, found from the model's
structure, not from a table of model names: the decoder layers are the ModuleList with one
entry per hidden layer; in the last one the feed-forward block is the child named mlp (GPT-2,
GPT-NeoX/Pythia, Llama, Mistral, Qwen2, Gemma, Phi, Falcon), feed_forward, ffn or
block_sparse_moe (Mixtral), or else its first Linear that widens the hidden state (OPT's fc1).
A model where none is found gets the final hidden state (the output layer's input), with a
warning; the datastore records which (key_type "ffn_in_ln" or "final_hidden").

The text. WikiText's `.tokens` files are already split into words (and rare words are <unk>);
a subword tokenizer is given each line as its words joined by single spaces, then "\\n" where
the project's own vocabulary has <eos>, one line per call, without special tokens (no BOS):
the newline is the paragraph break the model saw in pre-training, and the model's own
tokenizer splits the words as it would in any text. Nothing is detokenised (" @-@ " and
"<unk>" stay as written), so perplexities are per model token on WikiText's spelling, and
not comparable with published numbers on raw text or per word. The word-level tokenizer that
export.py writes maps the same text to exactly the project's token ids.

Weights are loaded in float32 (exact, and fast on any CPU); the memory a model needs is
estimated from its config before anything is loaded.
"""
import array
import functools
import hashlib
import json
import os
import re
import socket
import sys
import urllib.parse
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import knnlm
from knnlm import KnnlmError
from knnlm_tools import cpu

KEY_TYPES = {
    "ffn_in_ln": "input of the last layer's feed-forward block, after its LayerNorm (a forward hook; the paper's best)",
    "final_hidden": "the final hidden state, the output layer's input (the fallback where no feed-forward block is found)",
}
FFN_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
DEFAULT_WINDOW = 1024      # tokens per window when the model's context is longer (the paper: 3072)
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")


def is_huggingface(spec):
    """Whether --checkpoint names a Hugging Face model: a directory (save_pretrained's), or a hub name
    (no such file here, and not a .pt path)."""
    return os.path.isdir(spec) or (not os.path.exists(spec) and not spec.endswith(".pt")
                                   and HUB_NAME.fullmatch(spec) is not None)


# -----------------------------------------------------------------------------
# The model: logits and keys, from any causal LM

@dataclass
class WindowConfig:
    """What the kNN-LM code reads of a model's config: its window, the width of its keys and of its output."""
    block_size: int
    d_model: int
    vocab_size: int


class HuggingFaceLM(nn.Module):
    """A transformers causal LM with the interface of knnlm.TransformerLM: idx [B, T] -> logits [B, T, V]
    (at the positions of `at` only), and the keys [B, T, d] of a key type (KEY_TYPES) when asked for."""

    def __init__(self, hf, window, name):
        super().__init__()
        self.hf, self.name = hf, name
        ffn, self.key_found = find_ffn_block(hf)
        self.key_types = (["ffn_in_ln"] if ffn is not None else []) + ["final_hidden"]
        self.cfg = WindowConfig(window, hf.config.get_text_config().hidden_size, hf.get_output_embeddings().weight.shape[0])
        self.taps = {}
        if ffn is not None:
            ffn.register_forward_pre_hook(self.tap, with_kwargs=True)

    def tap(self, module, args, kwargs):
        """Forward pre-hook on the feed-forward block: its input is the key."""
        self.taps["ffn_in_ln"] = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))

    def forward(self, idx, key_type=None, at=None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the window {self.cfg.block_size}")
        if key_type is not None and key_type not in self.key_types:
            raise KnnlmError(f"{self.name} has no key {key_type!r}: its keys are {', '.join(self.key_types)}")
        self.taps.clear()
        out = self.hf(input_ids=idx, use_cache=False, output_hidden_states=key_type == "final_hidden")
        logits = out.logits if at is None else out.logits[at]
        if key_type is None:
            return logits
        keys = out.hidden_states[-1] if key_type == "final_hidden" else self.taps.pop("ffn_in_ln")
        return logits, keys.reshape(B, T, -1)


def decoder_layers(hf):
    """The model's decoder layers: the ModuleList with one entry per hidden layer (None if there is none)."""
    n = getattr(hf.config.get_text_config(), "num_hidden_layers", None)
    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return lists[0] if lists else None


def find_ffn_block(hf):
    """-> (the module whose input is the paper's key, where it is) or (None, why not), from the structure."""
    layers = decoder_layers(hf)
    if layers is None:
        return None, "no list of decoder layers"
    layer_index = len(layers) - 1
    for name, child in layers[-1].named_children():
        if name in FFN_NAMES:
            return child, f"layer {layer_index}: {name} ({type(child).__name__})"
    d = hf.config.get_text_config().hidden_size
    for name, child in layers[-1].named_children():
        if isinstance(child, nn.Linear) and child.in_features == d and child.out_features > d:
            return child, f"layer {layer_index}: {name} (the feed-forward block's first Linear)"
    return None, f"no feed-forward block in layer {layer_index} ({type(layers[-1]).__name__})"


# -----------------------------------------------------------------------------
# The tokenizer, in the place of knnlm.Vocab

def line_text(words):
    """One WikiText line as text for a tokenizer: its words, then the newline where <eos> stands."""
    return " ".join(words) + "\n"


class TokenizerVocab:
    """A Hugging Face tokenizer with the interface of knnlm.Vocab that the scripts use: encode_file,
    encode_prompt, decode, itos[i], unk, len() (the model's output width)."""

    def __init__(self, tokenizer, size):
        self.tokenizer, self.size = tokenizer, size
        self.unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else -1
        self.itos = TokenText(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.identity = type(tokenizer).__name__ + "\n" + (
            backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())))

    def __len__(self):
        return self.size

    def encode(self, texts):
        ids = [i for line in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] for i in line]
        if ids and max(ids) >= self.size:
            raise KnnlmError(f"the tokenizer gives token id {max(ids)}, beyond the model's {self.size} outputs")
        return ids

    def encode_file(self, path, lines_per_call=4096):
        ids, lines = array.array("q"), []  # 8 bytes a token, not an int object and its pointer in a list
        for words in knnlm.read_lines(path, desc=f"tokenize {os.path.basename(path)}"):
            lines.append(line_text(words))
            if len(lines) == lines_per_call:
                ids.extend(self.encode(lines))
                lines = []
        ids.extend(self.encode(lines) if lines else [])
        return torch.from_numpy(np.frombuffer(ids, dtype=np.int64))

    def encode_prompt(self, text):
        """A prompt that begins a new paragraph: the newline that ends the one before, then its words."""
        return self.encode(["\n"]) + (self.encode([" ".join(text.split())]) if text.split() else [])

    def decode(self, ids):
        return self.tokenizer.decode(ids)


class TokenText:
    """itos[i]: the text of token i."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getitem__(self, i):
        return self.tokenizer.decode([i])


# -----------------------------------------------------------------------------
# Loading, with one line for whatever is wrong

def load(spec, device="cpu", window=None):
    """-> (HuggingFaceLM in eval mode, TokenizerVocab, {"config", "fingerprint"}) of a model directory or hub name."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise KnnlmError(f"{spec} is a directory without config.json: not a model written by save_pretrained "
                         "(--checkpoint takes that, a hub name, or a .pt file of train.py)")
    with quiet():
        config = hub_call(spec, AutoConfig.from_pretrained, spec)
    archs = config.architectures or []
    if (archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)) or config.is_encoder_decoder \
            or type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise KnnlmError(f"{spec} is {'a ' + archs[0] if archs else 'a ' + config.model_type + ' model'}, not a causal "
                         "language model (kNN-LM needs one that predicts the next token from the tokens before it)")
    context = next((getattr(config.get_text_config(), f) for f in CONTEXT_FIELDS
                    if isinstance(getattr(config.get_text_config(), f, None), int)), None)
    if window is None:
        window = min(context or DEFAULT_WINDOW, DEFAULT_WINDOW)
    elif context is not None and window > context:
        raise KnnlmError(f"--window {window} is longer than the context of {spec} ({context} tokens)")
    if os.path.isdir(spec) and not any(os.path.isfile(os.path.join(spec, f)) for f in TOKENIZER_FILES):
        raise KnnlmError(f"{spec} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's "
                         "tokenizer beside it (tokenizer.save_pretrained)")
    with quiet():
        tokenizer = hub_call(spec, AutoTokenizer.from_pretrained, spec)
    check_memory(spec, config, device)
    with quiet():
        hf = hub_call(spec, AutoModelForCausalLM.from_pretrained, spec, dtype=torch.float32)
    model = HuggingFaceLM(hf.to(device).eval(), window, spec)
    check_causal(model, spec)
    if "ffn_in_ln" not in model.key_types:
        print(f"warning: {spec} ({type(hf).__name__}): {model.key_found}; the key is the final hidden state "
              "instead of the paper's (the last feed-forward block's input)", file=sys.stderr)
    vocab = TokenizerVocab(tokenizer, model.cfg.vocab_size)
    info = {"config": {"name": spec, "window": window, **model_config(hf)}}
    model.known_fingerprint = weights_fingerprint(model, vocab)
    info["fingerprint"] = model.known_fingerprint
    return model, vocab, info


def model_config(hf):
    """The model's config as plain data, without what changes with the folder or the library's version."""
    config = hf.config.to_dict()
    for field in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(field, None)
    return json.loads(json.dumps(config, default=str))


def weights_fingerprint(model, vocab):
    """A short hash of the config, the tokenizer and the weights (checkpoints.fingerprint of the project's models)."""
    h = hashlib.sha256(json.dumps(model_config(model.hf), sort_keys=True).encode())
    h.update(vocab.identity.encode())
    for name, t in sorted(model.hf.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def hub_call(spec, load_fn, *args, **kwargs):
    """A transformers loader, its failures as one line (a hub name without the internet: say to pass a directory).
    A hub name with the hub out of reach is read from the local cache only (local_files_only): a model cached
    before loads at once, any other fails at once, instead of after half a minute of the hub's retries."""
    if not os.path.isdir(spec) and hub_unreachable():
        kwargs["local_files_only"] = True
    try:
        return load_fn(*args, **kwargs)
    except OSError as e:
        if os.path.isdir(spec):
            raise KnnlmError(f"cannot load {spec}: {first_line(e)}") from None
        raise KnnlmError(f"{spec} is not a checkpoint file or a model directory here, and it could not be loaded "
                         "from the Hugging Face hub (no internet, or no such model there?): pass a local directory "
                         f"written by save_pretrained ({first_line(e)})") from None
    except Exception as e:
        raise KnnlmError(f"cannot load {spec}: {type(e).__name__}: {first_line(e)}") from None


@functools.lru_cache(maxsize=None)
def hub_unreachable():
    """Whether the Hugging Face hub's host does not resolve (and no proxy would resolve it for us); asked
    once a process, not at each of a load's three loaders."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    from huggingface_hub import constants
    try:
        socket.getaddrinfo(urllib.parse.urlparse(constants.ENDPOINT).hostname, 443)
        return False
    except OSError:
        return True


def first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class quiet(warnings.catch_warnings):
    """transformers' advice on matters kNN-LM does not touch (generation configs, unused weights), silenced."""

    def __enter__(self):
        super().__enter__()
        warnings.simplefilter("ignore")
        from transformers.utils import logging
        self.verbosity = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging
        logging.set_verbosity(self.verbosity)
        return super().__exit__(*exc)


def check_memory(spec, config, device):
    """Refuse, before loading, a model whose float32 weights alone do not fit in the memory free on device."""
    from transformers import AutoModelForCausalLM
    with quiet(), torch.device("meta"):
        try:
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        except Exception:  # a config the estimate cannot build: the load will say what is wrong
            return
    free = cpu.memory_free(device)
    if free is not None and 4 * n > free:
        raise KnnlmError(f"{spec} has {n / 1e9:.1f} B parameters: {4 * n / 1e9:,.1f} GB in float32, more than the "
                         f"{free / 1e9:,.1f} GB free on {device}")


@torch.no_grad()
def check_causal(model, spec, n=8):
    """A causal LM's outputs at a position do not depend on the tokens after it: change the last token and see."""
    n = min(n, model.cfg.block_size)
    x = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % model.cfg.vocab_size
    device = next(model.parameters()).device
    a, b = model(x.to(device))[0, :-1], model(y.to(device))[0, :-1]
    if n > 1 and not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise KnnlmError(f"{spec} is not a causal language model: its predictions depend on the tokens after them")
