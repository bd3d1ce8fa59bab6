"""Dense and block-sparse attention against explicit references, and the BlockSparseAttention layer."""

from __future__ import annotations

import math

import pytest
import torch

from worldmodel.attention import BlockSparseAttention, block_sparse_attention, dense_attention
from worldmodel.rope import GeometryRoPE, patch_geometry


def qkv(b: int, h: int, nq: int, nk: int, d: int = 8, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq, d, generator=gen, dtype=dtype), torch.randn(b, h, nk, d, generator=gen, dtype=dtype),
            torch.randn(b, h, nk, d, generator=gen, dtype=dtype))


def random_mask(b: int, n: int, p: float = 0.3, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < p


def reference_sparse(q, k, v, block_q, block_k, topk, top_p=None, mask=None, keep_diagonal=False):
    """One query block at a time: pool, score, choose blocks, then masked dense softmax. Plain loops, float64."""
    q, k, v = q.double(), k.double(), v.double()
    b_, h_, nq, d = q.shape
    nk = k.shape[2]
    mask = [[False] * nk] * b_ if mask is None else mask.tolist()
    out = torch.zeros(b_, h_, nq, v.shape[-1], dtype=torch.float64)
    kblocks = [range(j, min(j + block_k, nk)) for j in range(0, nk, block_k)]
    for b in range(b_):
        for h in range(h_):
            for i0 in range(0, nq, block_q):
                qi = range(i0, min(i0 + block_q, nq))
                pooled_q = q[b, h, list(qi)].mean(0)
                scores = []
                for keys in kblocks:
                    live = [j for j in keys if not mask[b][j]]
                    scores.append(float(pooled_q @ k[b, h, live].mean(0)) / math.sqrt(d) if live else -math.inf)
                scores = torch.tensor(scores, dtype=torch.float64)
                forced = set()
                if keep_diagonal and nq == nk:
                    forced = {j for j, keys in enumerate(kblocks) if set(keys) & set(qi) and scores[j] > -math.inf}
                order = sorted(forced) + [j for j in torch.argsort(scores, descending=True).tolist() if j not in forced]
                chosen = order[:max(topk, len(forced))]
                if top_p is not None:
                    probs, mass, kept = scores.softmax(0), 0.0, []
                    for j in chosen:
                        if mass < top_p or j in forced:
                            kept.append(j)
                        mass += float(probs[j])
                    chosen = kept
                keys = [j for c in chosen for j in kblocks[c] if not mask[b][j]]
                if keys:
                    a = (q[b, h, list(qi)] @ k[b, h, keys].T / math.sqrt(d)).softmax(-1)
                    out[b, h, list(qi)] = a @ v[b, h, keys]
    return out


def test_shapes_and_dtypes():
    for dtype in (torch.float32, torch.float64):
        q, k, v = qkv(2, 3, 20, 33, d=8, dtype=dtype)
        v = torch.cat([v, v], -1)  # value width may differ from the key width
        for out in (dense_attention(q, k, v), block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=2)):
            assert out.shape == (2, 3, 20, 16) and out.dtype == dtype


@pytest.mark.parametrize("nq, nk, block_q, block_k, masked, keep_diagonal", [
    (64, 64, 16, 16, False, True),  # exact multiple
    (50, 50, 16, 16, False, True),  # padded
    (50, 50, 16, 8, True, True),  # padded, masked, unequal blocks
    (37, 50, 8, 16, True, False),  # cross attention
])
def test_sparse_with_every_block_equals_dense(nq, nk, block_q, block_k, masked, keep_diagonal):
    q, k, v = qkv(2, 2, nq, nk)
    mask = random_mask(2, nk) if masked else None
    dense = dense_attention(q, k, v, mask)
    sparse = block_sparse_attention(q, k, v, block_q=block_q, block_k=block_k, topk=math.ceil(nk / block_k),
                                    key_padding_mask=mask, keep_diagonal=keep_diagonal)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    ref = reference_sparse(q, k, v, block_q, block_k, 99, mask=mask)
    torch.testing.assert_close(dense.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("topk, top_p, keep_diagonal, masked", [
    (2, None, False, False), (2, None, True, True), (3, 0.5, False, True), (3, 1e-6, True, False),
])
def test_sparse_matches_loop_reference_at_small_topk(topk, top_p, keep_diagonal, masked):
    q, k, v = qkv(2, 2, 45, 45, seed=3)
    mask = random_mask(2, 45, seed=4) if masked else None
    got = block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=topk, top_p=top_p, key_padding_mask=mask,
                                 keep_diagonal=keep_diagonal)
    want = reference_sparse(q, k, v, 8, 8, topk, top_p=top_p, mask=mask, keep_diagonal=keep_diagonal)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (got - dense_attention(q, k, v, mask)).abs().max() > 1e-2  # really sparse


def test_top_p_keeps_at_least_one_block():
    q, k, v = qkv(1, 2, 32, 32, seed=5)
    out = block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=4, top_p=1e-9, keep_diagonal=False)
    one = block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=1, keep_diagonal=False)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, one)


def test_fully_masked_keys_give_zeros_not_nan():
    q, k, v = qkv(2, 2, 20, 20, seed=6)
    q.requires_grad_(True)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True
    for fn in (lambda: dense_attention(q, k, v, mask),
               lambda: block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=1, key_padding_mask=mask)):
        out = fn()
        assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0
        (grad,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(grad).all()


def test_diagonal_block_is_always_kept():
    # keys of a distant block align with every query, yet each query block still sees its own block
    q, k, v = qkv(1, 1, 32, 32, seed=7)
    k[..., 24:, :] = 10 * q.mean(2, keepdim=True)
    out = block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=1, keep_diagonal=True)
    want = reference_sparse(q, k, v, 8, 8, 1, keep_diagonal=True)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    off = block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=1, keep_diagonal=False)
    assert (out[..., :8, :] - off[..., :8, :]).abs().max() > 1e-2


def test_bad_attention_inputs():
    q, k, v = qkv(1, 2, 16, 16)
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        dense_attention(q, k, v, torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=1, key_padding_mask=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="need q"):
        dense_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="topk must be"):
        block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=0)
    with pytest.raises(ValueError, match="top_p"):
        block_sparse_attention(q, k, v, block_q=8, block_k=8, topk=1, top_p=1.5)


def clip_geometry(b: int = 2, t: int = 2, h: int = 8, w: int = 16):
    gen = torch.Generator().manual_seed(0)
    depth = 0.5 + 3 * torch.rand(b, t, h, w, generator=gen)
    k = torch.tensor([[20.0, 0, w / 2], [0, 20, h / 2], [0, 0, 1]]).expand(b, t, 3, 3)
    pose = torch.eye(4).repeat(b, t, 1, 1)
    pose[..., :3, :3] = torch.tensor([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    pose[:, 1, 0, 3] = 0.3  # second frame a bit further forward
    return patch_geometry(depth, k, pose, patch=4)  # N = 16 tokens per clip


@pytest.mark.parametrize("mode", [None, "2d", "3d-world", "prope"])
@pytest.mark.parametrize("sparse", [False, True])
def test_layer_forward_backward_with_every_rope(mode, sparse):
    torch.manual_seed(0)
    geom = clip_geometry()
    rope = None if mode is None else GeometryRoPE(16, mode)
    layer = BlockSparseAttention(32, 2, rope, sparse=sparse, block_q=4, block_k=4, topk=2)
    x = torch.randn(2, 16, 32, requires_grad=True)
    out = layer(x, geom)
    assert out.shape == (2, 16, 32) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_layer_cross_attention_with_padding():
    torch.manual_seed(0)
    geom = clip_geometry()
    frame = type(geom)(geom.grid[:, 8:], geom.points[:, 8:], geom.valid[:, 8:], geom.time[:, 8:], geom.proj[:, 8:],
                       geom.anchor)
    layer = BlockSparseAttention(32, 2, GeometryRoPE(16, "3d-world"), sparse=True, block_q=4, block_k=4, topk=8)
    x, ctx = torch.randn(2, 8, 32), torch.randn(2, 16, 32)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, :8] = True  # the first clip has no earlier frame
    sparse = layer(x, frame, context=ctx, context_geom=geom, key_padding_mask=pad)
    layer.sparse = False
    dense = layer(x, frame, context=ctx, context_geom=geom, key_padding_mask=pad)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


def test_switching_sparse_at_run_time():
    torch.manual_seed(0)
    geom = clip_geometry()
    layer = BlockSparseAttention(32, 2, GeometryRoPE(16, "2d"), block_q=4, block_k=4, topk=4)
    x = torch.randn(2, 16, 32)
    dense = layer(x, geom)
    layer.sparse = True
    torch.testing.assert_close(layer(x, geom), dense, atol=1e-5, rtol=1e-5)  # 4 of 4 blocks: exact
    layer.topk = 1
    assert (layer(x, geom) - dense).abs().max() > 1e-3
    layer.sparse = False
    torch.testing.assert_close(layer(x, geom), dense)


def test_bad_layer_inputs():
    geom = clip_geometry()
    with pytest.raises(ValueError, match="divisible by heads"):
        BlockSparseAttention(30, 4)
    with pytest.raises(ValueError, match="rope.head_dim"):
        BlockSparseAttention(32, 2, GeometryRoPE(32, "2d"))
    layer = BlockSparseAttention(32, 2, GeometryRoPE(16, "prope"))
    with pytest.raises(ValueError, match="pass geom"):
        layer(torch.randn(2, 16, 32))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 16, 31), geom)
    with pytest.raises(ValueError, match="context must be"):
        layer(torch.randn(2, 16, 32), geom, context=torch.randn(3, 16, 32), context_geom=geom)
    with pytest.raises(ValueError, match="geometry for q"):
        layer(torch.randn(2, 12, 32), geom)
