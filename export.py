"""
Write a model of train.py as a Hugging Face `transformers` GPT-2 model directory, with a
word-level tokenizer of its vocabulary (the `tokenizers` library), so that any tool that
reads such models (and the hub) can use it. TransformerLM is GPT-2's architecture:
pre-LayerNorm blocks, GELU, learned positions, tied input and output embeddings.

    python export.py --checkpoint runs/model.pt --out runs/model-hf
    python evaluate.py --checkpoint runs/model-hf --datastore runs/datastore-hf ...

The exported model gives the same logits and keys as the checkpoint (to float rounding); its
tokenizer reads WikiText lines as the project does (knnlm_tools/huggingface.py). A datastore
is tied to the model it was built with, so build one with the exported model to use it.
"""
import argparse

from knnlm_tools import checkpoints, gpt2, cli

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
parser.add_argument("--checkpoint", default="runs/model.pt",
                    help="the checkpoint of train.py to convert (default: %(default)s)")
parser.add_argument("--out", required=True, help="the model directory to write (must not exist, or be empty)")
args = parser.parse_args()

with cli.user_errors(interrupted="nothing was written"):
    model, vocab, _ = checkpoints.load_checkpoint(args.checkpoint)
    gpt2.export_gpt2(model, vocab, args.out)
print(f"wrote {args.out}: GPT-2, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
      f"{len(vocab):,} words; load it with transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained, "
      f"or pass it as --checkpoint")
