"""
Training steps of this project's model as train.py takes them, for the benches that time one or
compare two (bench.levers, bench.bernoulli, bench.fused_cross_entropy, bench.training_memory).
"""
import torch
import torch.nn.functional as F

import knnlm
from bench import in_turn
from knnlm_tools import cpu


def batch_of(tokens, block_size, windows):
    """The first `windows` windows of `tokens` and their next tokens: (x, y), each [windows, block_size]."""
    x = torch.stack([tokens[i * block_size:(i + 1) * block_size] for i in range(windows)])
    y = torch.stack([tokens[i * block_size + 1:(i + 1) * block_size + 1] for i in range(windows)])
    return x, y


def training_step(model, x, y, optimizer, precision="float32", loss_fn=F.cross_entropy, grad_clip=None):
    with cpu.autocast(precision, "cpu"):
        loss = loss_fn(model(x).flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:  # as train.py's --grad-clip
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def copies_in_turn(cfg, step, steps, setups):
    """Two copies of knnlm.TransformerLM(cfg) from the same weights, each with its AdamW, stepped in turn
    (in_turn, setups[name]() before each step): step(name, model, optimizer) is one training step, and
    each copy's step n draws the same random numbers. -> ({name: seconds of each step}, whether the
    copies' weights are still equal, bit for bit)."""
    models, optimizers, done = {}, {}, {name: 0 for name in setups}
    for name in setups:
        torch.manual_seed(0)
        models[name] = copy = knnlm.TransformerLM(cfg).train()
        optimizers[name] = torch.optim.AdamW(copy.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def one_step(name):
        torch.manual_seed(done[name])
        done[name] += 1
        step(name, models[name], optimizers[name])

    runs = in_turn({name: lambda name=name: one_step(name) for name in setups}, steps, setups)
    same = all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models.values())))
    return runs, same
