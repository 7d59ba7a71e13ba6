"""RoPE: our one-roll rotation equals the half-split rotation transformers applies."""

from __future__ import annotations

import torch

from quicksilver.models.config import ModelConfig
from quicksilver.models.transformer import apply_rope, rope_inverse_frequencies, rope_tables


def reference_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    angles = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * emb.cos().to(x.dtype) + rotated * emb.sin().to(x.dtype)


def test_rotation_is_bitwise_the_reference():
    config = ModelConfig(
        family="llama",
        vocab_size=10,
        hidden_size=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        intermediate_size=8,
        max_position_embeddings=4096,
        rope_theta=100000.0,
    )
    inv_freq = rope_inverse_frequencies(config)
    positions = torch.tensor([[0, 1, 7, 4000], [3, 3, 2, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 6, 16).to(dtype)
        ours = apply_rope(x, *rope_tables(inv_freq, positions, dtype))
        assert torch.equal(ours, reference_rope(x, positions, inv_freq))
