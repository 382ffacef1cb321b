"""Hugging Face causal LMs as kNN-LM's model: the hooked key, the LM perplexity against transformers' own
loss, build -> evaluate -> sample, the project's model exported to GPT-2 and read back, and one line
for each bad input. Every model is made here from a config, with a tokenizer trained on the tiny
corpus: nothing is downloaded."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

import knnlm
from knnlm import KnnlmError
from knnlm_tools import checkpoints, datastores, gpt2, huggingface
from helpers import fails, run, tiny_model, write_corpus

CONTEXT = 32
TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=CONTEXT)
FAMILIES = {  # what the structure search must find in each family's last layer, as the docs list it
    "gpt2": (lambda V: GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=CONTEXT, vocab_size=V)),
             "layer 1: mlp (GPT2MLP)"),
    "llama": (lambda V: LlamaForCausalLM(LlamaConfig(vocab_size=V, **TINY)), "layer 1: mlp (LlamaMLP)"),
    "gpt_neox": (lambda V: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, **TINY)), "layer 1: mlp (GPTNeoXMLP)"),
    "mistral": (lambda V: MistralForCausalLM(MistralConfig(vocab_size=V, num_key_value_heads=2, **TINY)),
                "layer 1: mlp (MistralMLP)"),
    "qwen2": (lambda V: Qwen2ForCausalLM(Qwen2Config(vocab_size=V, num_key_value_heads=2, **TINY)),
              "layer 1: mlp (Qwen2MLP)"),
    "opt": (lambda V: OPTForCausalLM(OPTConfig(vocab_size=V, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                               ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=CONTEXT)),
            "layer 1: fc1 (the feed-forward block's first Linear)"),
}


def train_tokenizer(data):
    """A byte-level BPE tokenizer (GPT-2's kind) trained on the corpus' training split."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([knnlm.split_path(data, "train")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def save(model, tokenizer, path):
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A corpus, and a tiny GPT-2 and Llama saved with a tokenizer trained on it: (root, corpus, {family: dir})."""
    root = tmp_path_factory.mktemp("hf")
    data = write_corpus(root / "corpus", n_lines=(80, 15, 15))
    tokenizer = train_tokenizer(data)
    dirs = {}
    for family in ("gpt2", "llama"):
        torch.manual_seed(0)
        dirs[family] = save(FAMILIES[family][0](len(tokenizer)), tokenizer, root / family)
    return root, data, dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_the_key_is_found_from_the_structure(family):
    model = FAMILIES[family][0](300)
    block, where = huggingface.find_ffn_block(model)
    assert where == FAMILIES[family][1]
    assert block is not None


def test_hooked_key_is_the_feed_forward_input_recomputed_by_hand(hf):
    root, data, dirs = hf
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for family in ("gpt2", "llama"):
            model, _, _ = huggingface.load(dirs[family])
            logits, keys = model(x, key_type="ffn_in_ln")
            out = model.hf(x, output_hidden_states=True)
            h = out.hidden_states[-2]  # the input of the last layer
            if family == "gpt2":
                last = model.hf.transformer.h[-1]
                by_hand = last.ln_2(h + last.attn(last.ln_1(h))[0])
            else:
                last = model.hf.model.layers[-1]
                rope = model.hf.model.rotary_emb(h, torch.arange(x.shape[1])[None])
                attn = last.self_attn(hidden_states=last.input_layernorm(h), position_embeddings=rope, attention_mask=None)
                by_hand = last.post_attention_layernorm(h + attn[0])
            torch.testing.assert_close(keys, by_hand)
            torch.testing.assert_close(logits, out.logits)


def test_no_feed_forward_block_found_falls_back_to_the_final_hidden_state(hf, monkeypatch, capsys):
    root, data, dirs = hf
    monkeypatch.setattr(huggingface, "FFN_NAMES", ())  # GPT-2's Conv1D is no nn.Linear: nothing is found
    model, _, _ = huggingface.load(dirs["gpt2"])
    assert "the key is the final hidden state" in capsys.readouterr().err
    assert checkpoints.key_type(model, "ffn_in_ln") == "final_hidden"
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, keys = model(x, key_type="final_hidden")
        torch.testing.assert_close(keys, model.hf(x, output_hidden_states=True).hidden_states[-1])
    with pytest.raises(KnnlmError, match="has no key 'ffn_in_ln'"):
        model(x, key_type="ffn_in_ln")


def transformers_perplexity(model_dir, tokens, window, min_context):
    """The perplexity of tokens from transformers' own loss, over the windows kNN-LM scores."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for begin, end, first in knnlm.sliding_windows(len(tokens), window, min_context):
            x, targets = tokens[begin:end][None], tokens[begin + 1:end + 1][None].clone()
            targets[0, :first] = -100  # scored before, in an earlier window
            count = (targets != -100).sum().item()  # shift_labels: targets already aligned with the positions
            nll += hf(input_ids=x, labels=targets, shift_labels=targets).loss.item() * count
            n += count
    assert n == len(tokens) - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_build_evaluate_sample_and_the_lm_perplexity_is_transformers_own(hf, family):
    root, data, dirs = hf
    ds = root / f"ds-{family}"
    # float32, as transformers computes below (--precision auto is bfloat16 on a CPU with native bfloat16)
    run("build_datastore.py", "--data", data, "--checkpoint", dirs[family], "--out", ds, "--precision", "float32",
        cwd=root)
    assert json.loads((ds / "meta.json").read_text())["key_type"] == "ffn_in_ln"
    result = run("evaluate.py", "--data", data, "--checkpoint", dirs[family], "--datastore", ds, "--k", 16,
                 "--lambda", 0, "--precision", "float32", "--results", root / f"{family}.json", cwd=root)
    numbers = json.loads((root / f"{family}.json").read_text())
    assert numbers["knnlm_ppl"] == numbers["lm_ppl"], result.stdout  # λ = 0 is the LM, exactly
    model, vocab, _ = huggingface.load(dirs[family])
    tokens = vocab.encode_file(knnlm.split_path(data, "test"))
    assert numbers["lm_ppl"]["test"] == pytest.approx(transformers_perplexity(dirs[family], tokens, CONTEXT, CONTEXT // 2),
                                                      rel=1e-5)
    sampled = run("sample.py", "--checkpoint", dirs[family], "--datastore", ds, "--k", 16, "--prompt", "the cat",
                  "--tokens", 5, "--show-neighbours", 2, cwd=root)
    assert "kNN-LM:" in sampled.stdout and "p_kNN" in sampled.stdout


def test_the_project_model_exported_gives_the_same_numbers_and_keys(work):
    root, data = work
    run("export.py", "--out", root / "model-hf", cwd=root)
    native_vocab = checkpoints.load_checkpoint(str(root / "runs" / "model.pt"))[1]
    _, vocab, _ = huggingface.load(str(root / "model-hf"))
    for split in knnlm.SPLITS:  # the exported word-level tokenizer reads WikiText as the project does
        path = knnlm.split_path(data, split)
        assert torch.equal(vocab.encode_file(path), native_vocab.encode_file(path))
    # both in float32: bfloat16 (--precision auto on a CPU with native bfloat16) rounds where each model computes
    for checkpoint, ds in (("runs/model.pt", "ds-native"), ("model-hf", "ds-hf")):
        run("build_datastore.py", "--data", data, "--checkpoint", root / checkpoint, "--out", root / ds,
            "--precision", "float32", cwd=root)
    ours, theirs = (np.load(root / d / "keys.npy").astype(np.float32) for d in ("ds-native", "ds-hf"))
    np.testing.assert_allclose(theirs, ours, rtol=2e-3, atol=2e-3)  # float16 keys: a rounding apart at most
    assert np.array_equal(np.load(root / "ds-native/vals.npy"), np.load(root / "ds-hf/vals.npy"))
    numbers = {}
    for name, checkpoint, ds in [("native", "runs/model.pt", "ds-native"), ("hf", "model-hf", "ds-hf")]:
        run("evaluate.py", "--data", data, "--checkpoint", checkpoint, "--datastore", ds, "--k", 8,
            "--precision", "float32", "--results", f"{name}.json", cwd=root)
        numbers[name] = json.loads((root / f"{name}.json").read_text())
    for kind in ("lm_ppl", "knnlm_ppl"):
        for split in ("valid", "test"):
            assert numbers["hf"][kind][split] == pytest.approx(numbers["native"][kind][split], rel=1e-5)
    model, vocab, _ = checkpoints.load_model(str(root / "model-hf"))
    with pytest.raises(KnnlmError, match="was built with another model or tokenizer"):  # the native model's datastore
        datastores.DiskDatastore(str(root / "runs" / "datastore")).check_model(model, vocab)
    with pytest.raises(KnnlmError, match="already exists"):
        gpt2.export_gpt2(*checkpoints.load_checkpoint(str(root / "runs" / "model.pt"))[:2], str(root / "model-hf"))
    fails(run("export.py", "--checkpoint", root / "model-hf", "--out", root / "again", cwd=root, check=False),
          f"{root / 'model-hf'} is a directory, not a checkpoint file of train.py")  # export converts train.py's only


def test_a_model_that_is_not_a_causal_lm_is_refused(hf):
    root, data, dirs = hf
    torch.manual_seed(0)
    bert = save(BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=300)), train_tokenizer(data), root / "bert")
    fails(run("evaluate.py", "--data", data, "--checkpoint", bert, cwd=root, check=False),
          "is a BertForMaskedLM, not a causal language model")


OUT_OF_REACH = {"HF_ENDPOINT": "https://hub.invalid", "HF_HUB_OFFLINE": "0"}  # .invalid never resolves (RFC 2606)


def test_a_hub_name_without_the_internet_says_to_pass_a_directory(hf):
    root, data, _ = hf
    fails(run("build_datastore.py", "--data", data, "--checkpoint", "openai-community/gpt2", cwd=root, check=False,
              env={**os.environ, "HF_HUB_OFFLINE": "1"}), "pass a local directory written by save_pretrained")
    # the hub out of reach, as on a machine without the internet: the cache is read, not the hub retried
    result = run("build_datastore.py", "--data", data, "--checkpoint", "openai-community/gpt2", cwd=root, check=False,
                 env={**os.environ, **OUT_OF_REACH, "HF_HUB_CACHE": str(root / "empty-cache")})
    fails(result, "pass a local directory written by save_pretrained")
    assert len(result.stderr.splitlines()) == 1, result.stderr  # not the hub's own warnings first


def test_a_hub_name_cached_before_loads_with_the_hub_out_of_reach(hf, tmp_path):
    root, data, dirs = hf
    snapshot = tmp_path / "cache" / "models--knnlm-test--tiny-gpt2" / "snapshots" / ("0" * 40)
    shutil.copytree(dirs["gpt2"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    result = run("build_datastore.py", "--data", data, "--checkpoint", "knnlm-test/tiny-gpt2", "--out", tmp_path / "ds",
                 cwd=root, env={**os.environ, **OUT_OF_REACH, "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert "wrote" in result.stdout and "thrown while requesting" not in result.stderr, result.stderr


def test_bad_models_and_windows_get_one_line(hf, tmp_path):
    root, data, dirs = hf
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(dirs["gpt2"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(KnnlmError, match="has no tokenizer"):
        huggingface.load(str(no_tokenizer))
    with pytest.raises(KnnlmError, match="is a directory without config.json: not a model written by save_pretrained"):
        huggingface.load(str(tmp_path))  # e.g. the data directory given by mistake
    with pytest.raises(KnnlmError, match=f"--window 64 is longer than the context of .* \\({CONTEXT} tokens\\)"):
        huggingface.load(dirs["gpt2"], window=64)
    huge = tmp_path / "huge"  # a config too large for any machine; its weights are never written or read
    GPT2Config(n_layer=64, n_embd=32768, n_head=64, vocab_size=300, architectures=["GPT2LMHeadModel"]).save_pretrained(huge)
    for f in os.listdir(dirs["gpt2"]):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(dirs["gpt2"], f), huge)
    with pytest.raises(KnnlmError, match=r"has 824\.\d B parameters: .* GB in float32, more than the"):
        huggingface.load(str(huge))
    model, _, _ = huggingface.load(dirs["gpt2"])
    with pytest.raises(KnnlmError, match="--key-type attn_out is one of the project's own models"):
        checkpoints.key_type(model, "attn_out")
    with pytest.raises(KnnlmError, match="--window is for Hugging Face models"):
        checkpoints.load_model(native_checkpoint(tmp_path), window=8)


def native_checkpoint(tmp_path):
    vocab = knnlm.Vocab([knnlm.EOS, knnlm.UNK, "a", "b"])
    path = str(tmp_path / "model.pt")
    checkpoints.save_checkpoint(path, tiny_model(len(vocab)), vocab)
    return path
