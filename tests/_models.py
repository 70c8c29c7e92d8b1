"""Tiny models and data for the engine tests: every test case builds on these."""

from __future__ import annotations

import torch
from torch import nn


def tiny_gpt2(vocab: int = 40, d: int = 16, layers: int = 2, seed: int = 0, dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=d,
        n_layer=layers,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_llama(vocab: int = 40, d: int = 16, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def lm_data(n: int, vocab: int = 40, lo: int = 4, hi: int = 10, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (), generator=g))
        out.append({"input_ids": torch.randint(0, vocab, (length,), generator=g)})
    return out


def lm_queries(n: int, vocab: int = 40, prompt: int = 3, completion: int = 3, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (prompt + completion,), generator=g)
        labels = ids.clone()
        labels[:prompt] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 6, d_out: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class SharedMLP(nn.Module):
    """``shared`` is applied twice in one forward pass (tied weights)."""

    def __init__(self, d: int = 4, d_out: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, d)
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, d_out, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class Conv1DMLP(nn.Module):
    """An MLP built from HF ``Conv1D`` (GPT-2's transposed linear layer)."""

    def __init__(self, d_in: int = 5, hidden: int = 6, d_out: int = 3, seed: int = 0):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(seed)
        self.fc1 = Conv1D(hidden, d_in)
        self.fc2 = Conv1D(d_out, hidden)
        with torch.no_grad():
            self.fc1.bias.normal_()
            self.fc2.bias.normal_()

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def classification_data(n: int, d_in: int = 5, classes: int = 3, seed: int = 3) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i], y[i]) for i in range(n)]


def regression_data(n: int, d_in: int = 5, d_out: int = 3, seed: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return [(x[i], y[i]) for i in range(n)]
