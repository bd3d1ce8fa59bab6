"""Dense and block-sparse softmax attention, and the multi-head layer that uses them with `GeometryRoPE`.

Block-sparse attention follows SpargeAttn's selection step (Zhang et al. 2025): mean-pool queries per query block and
keys per key block, score block pairs by the pooled dot products, and let each query block attend, exactly, to the
keys of its best few key blocks only. The kept blocks are gathered into a dense (topk * block_k)-key problem per query
block, so the work scales with topk rather than with the sequence length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodel.rope import GeometryRoPE, TokenGeometry


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, heads, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"need q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if key_padding_mask is not None:
        want = (k.shape[0], k.shape[2])
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != want:
            raise ValueError(f"key_padding_mask must be bool (B, Nk) = {want}, True = ignore that key; got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def dense_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
    """Exact softmax attention. q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv) -> (B, H, Nq, dv).

    key_padding_mask (B, Nk) bool, True = ignore that key. A batch element with every key masked gets zeros.
    """
    _check_qkv(q, k, v, key_padding_mask)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    empty = key_padding_mask.all(dim=-1)  # (B,)
    # A row with no key would be 0/0 = NaN (also in the backward pass); let it see every key, then zero it.
    attend = ~key_padding_mask | empty[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
    return out.masked_fill(empty[:, None, None, None], 0.0)


def _pad_tokens(x: Tensor, length: int) -> Tensor:
    """Zero-pad dim 2 of (B, H, N, d) to `length`."""
    return F.pad(x, (0, 0, 0, length - x.shape[2])) if length > x.shape[2] else x


def diagonal_blocks(n: int, block_q: int, block_k: int, device: torch.device | None = None) -> Tensor:
    """(nQB, nKB) bool: key block j overlaps the token positions of query block i (self-attention, N tokens)."""
    nqb, nkb = math.ceil(n / block_q), math.ceil(n / block_k)
    start = torch.arange(nqb, device=device) * block_q
    end = torch.clamp(start + block_q, max=n) - 1  # last real token of the query block
    j = torch.arange(nkb, device=device)
    return (j >= (start // block_k)[:, None]) & (j <= (end // block_k)[:, None])


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, *, block_q: int, block_k: int, topk: int,
                           top_p: float | None = None, key_padding_mask: Tensor | None = None,
                           keep_diagonal: bool = True) -> Tensor:
    """Each query block attends exactly to its top-k key blocks. q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv)
    -> (B, H, Nq, dv).

    Blocks are scored by mean-pooled q . mean-pooled k / sqrt(d); a query block keeps its `topk` best key blocks.
    top_p: of those, keep only the best ones until their softmax mass over all block scores reaches top_p (at least
        one). The gathered shape stays topk blocks, so top_p sharpens attention but does not save more work.
    keep_diagonal: in self-attention (Nq == Nk) always keep the key blocks covering the query block's own positions,
        so a token can always see itself and its neighbours; they count towards topk, and when block_q > block_k
        needs more diagonal blocks than topk, the number kept grows to fit them.
    key_padding_mask (B, Nk) bool, True = ignore that key: blocks with every key masked are never chosen and masked
        keys inside a kept block get no weight. A query block whose kept keys are all masked outputs zeros.
    With topk >= number of key blocks (and top_p None) this equals dense attention.
    Tokens past a multiple of the block size are padding: padded keys are masked, padded queries dropped.
    """
    _check_qkv(q, k, v, key_padding_mask)
    for name, val in (("block_q", block_q), ("block_k", block_k), ("topk", topk)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int; got {val!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None; got {top_p}")
    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[-1]
    nqb, nkb = math.ceil(nq / block_q), math.ceil(nk / block_k)
    scale = d ** -0.5
    qb = _pad_tokens(q, nqb * block_q).unflatten(2, (nqb, block_q))  # (B, H, nQB, bq, d)
    kb = _pad_tokens(k, nkb * block_k).unflatten(2, (nkb, block_k))  # (B, H, nKB, bk, d)
    vb = _pad_tokens(v, nkb * block_k).unflatten(2, (nkb, block_k))

    ignore = None  # (B, nKB, bk) True = key takes no part: padding or masked
    if key_padding_mask is not None or nkb * block_k != nk:
        ignore = torch.ones(b, nkb * block_k, dtype=torch.bool, device=k.device)
        ignore[:, :nk] = False if key_padding_mask is None else key_padding_mask
        ignore = ignore.view(b, nkb, block_k)

    # 1. score blocks on pooled tokens; padded queries and ignored keys stay out of the means
    q_count = torch.clamp(nq - torch.arange(nqb, device=q.device) * block_q, max=block_q)
    pooled_q = qb.sum(3) / q_count[:, None].to(q.dtype)
    if ignore is None:
        pooled_k = kb.mean(3)
    else:
        use = (~ignore).to(k.dtype)  # (B, nKB, bk)
        pooled_k = (kb * use[:, None, :, :, None]).sum(3) / use.sum(-1).clamp(min=1)[:, None, :, None]
    scores = pooled_q @ pooled_k.transpose(-1, -2) * scale  # (B, H, nQB, nKB)
    if ignore is not None:
        scores = scores.masked_fill(ignore.all(-1)[:, None, None, :], float("-inf"))

    # 2. choose key blocks per query block
    n_keep = min(topk, nkb)
    ranking, forced = scores, None
    if keep_diagonal and nq == nk:
        diag = diagonal_blocks(nq, block_q, block_k)  # (nQB, nKB), built on the CPU: counting it needs no sync
        n_keep = min(nkb, max(n_keep, int(diag.sum(-1).max())))
        forced = diag.to(q.device) & (scores > float("-inf"))  # (B, H, nQB, nKB); all-masked blocks are useless
        ranking = scores.masked_fill(forced, float("inf"))
    idx = ranking.topk(n_keep, dim=-1).indices  # (B, H, nQB, n_keep), best first
    dropped = None  # (B, H, nQB, n_keep) True = kept slot cut by top_p
    if top_p is not None:
        mass = scores.softmax(-1).gather(-1, idx)
        dropped = (mass.cumsum(-1) - mass) >= top_p  # the first block has 0 mass before it, so it always stays
        if forced is not None:
            dropped &= ~forced.gather(-1, idx)

    # 3. gather the kept blocks: one row per (batch, head, key block), picked with index_select
    rows = (torch.arange(b * h, device=q.device).view(b, h, 1, 1) * nkb + idx).flatten()
    k_sel = kb.reshape(b * h * nkb, block_k, d).index_select(0, rows).view(b, h, nqb, n_keep * block_k, d)
    v_sel = vb.reshape(b * h * nkb, block_k, dv).index_select(0, rows).view(b, h, nqb, n_keep * block_k, dv)
    skip = None  # (B, H, nQB, n_keep, bk) True = this gathered key gets no weight
    if ignore is not None:
        batch_rows = (torch.arange(b, device=q.device).view(b, 1, 1, 1) * nkb + idx).flatten()
        skip = ignore.reshape(b * nkb, block_k).index_select(0, batch_rows).view(b, h, nqb, n_keep, block_k)
    if dropped is not None:
        cut = dropped[..., None].expand(b, h, nqb, n_keep, block_k)
        skip = cut if skip is None else skip | cut

    # 4. exact softmax(q k^T / sqrt(d)) v of each query block over its gathered keys, as one batched call
    #    with (batch, head, query block) folded into SDPA's batch dims: (B, H * nQB, bq, n_keep * bk)
    attend, empty = None, None
    if skip is not None:
        skip = skip.flatten(-2)  # (B, H, nQB, n_keep * bk)
        empty = skip.all(-1)  # nothing left to attend to: avoid 0/0, output zeros below
        attend = (~skip | empty[..., None]).view(b, h * nqb, 1, n_keep * block_k)
    out = F.scaled_dot_product_attention(qb.reshape(b, h * nqb, block_q, d), k_sel.view(b, h * nqb, -1, d),
                                         v_sel.view(b, h * nqb, -1, dv), attn_mask=attend)
    out = out.view(b, h, nqb, block_q, dv)
    if empty is not None:
        out = out.masked_fill(empty[..., None, None], 0.0)
    return out.flatten(2, 3)[:, :, :nq]


class BlockSparseAttention(nn.Module):
    """Multi-head self- or cross-attention with optional GeometryRoPE; dense, or block-sparse while .sparse is True.

    x (B, N, dim) -> (B, N, dim). Queries come from x, keys and values from `context` (default x).
    """

    def __init__(self, dim: int, heads: int, rope: GeometryRoPE | None = None, *, sparse: bool = False,
                 block_q: int = 16, block_k: int = 16, topk: int = 4, top_p: float | None = None) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"dim must be divisible by heads; got dim={dim}, heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        if rope is not None and rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim = {rope.head_dim} must equal dim / heads = {self.head_dim}")
        for name, val in (("block_q", block_q), ("block_k", block_k), ("topk", topk)):
            if val < 1:
                raise ValueError(f"{name} must be >= 1; got {val}")
        self.rope = rope
        self.sparse = sparse  # read at every forward, so it can be switched at run time
        self.block_q, self.block_k, self.topk, self.top_p = block_q, block_k, topk, top_p
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, sparse={self.sparse}, block_q={self.block_q}, "
                f"block_k={self.block_k}, topk={self.topk}, top_p={self.top_p}")

    def forward(self, x: Tensor, geom: TokenGeometry | None = None, context: Tensor | None = None,
                context_geom: TokenGeometry | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (B, N, dim), context (B, M, dim) or None (self-attention), key_padding_mask (B, M) -> (B, N, dim)."""
        self_attention = context is None
        if self_attention:
            if context_geom is not None:
                raise ValueError("context_geom given without context")
            context, context_geom = x, geom
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, {self.dim}); got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[-1] != self.dim or context.shape[0] != x.shape[0]:
            raise ValueError(f"context must be (B, M, {self.dim}) with B = {x.shape[0]}; got {tuple(context.shape)}")
        if self.rope is not None and (geom is None or context_geom is None):
            raise ValueError(f"this layer has {self.rope.mode!r} RoPE: pass geom (and context_geom with context)")
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.to_q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)
        k, v = self.to_kv(context).view(b, m, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope is not None:
            q, k, v = self.rope(q, k, v, geom, kv_geom=context_geom)
        if self.sparse:
            o = block_sparse_attention(q, k, v, block_q=self.block_q, block_k=self.block_k, topk=self.topk,
                                       top_p=self.top_p, key_padding_mask=key_padding_mask,
                                       keep_diagonal=self_attention)
        else:
            o = dense_attention(q, k, v, key_padding_mask)
        if self.rope is not None:
            o = self.rope.output(o, geom)
        return self.proj(o.transpose(1, 2).reshape(b, n, self.dim))


def _time_ms(fn, repeats: int = 20) -> float:
    """Best wall time of `repeats` calls, in ms (the best is the least disturbed by other load)."""
    import time

    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


if __name__ == "__main__":
    # Timing sanity check: sparse attention costs about topk / (number of key blocks) of dense, plus the block
    # scoring and the gather. On glibc, each call's fresh multi-MB buffers (gathered k, v) may be handed back to the
    # OS and page-faulted in again; in a VM that can cost as much as the attention itself. A caching allocator (GPU,
    # jemalloc) avoids it, as does MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 in the env.
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def compare(n: int, block: int, topk: int) -> None:
        q, k, v = (torch.randn(8, 4, n, 32) for _ in range(3))
        with torch.inference_mode():
            dense = _time_ms(lambda: dense_attention(q, k, v))
            sparse = _time_ms(lambda: block_sparse_attention(q, k, v, block_q=block, block_k=block, topk=topk))
        print(f"B=8 H=4 N={n} d=32 block={block} topk={topk}/{math.ceil(n / block)}: dense {dense:.2f} ms, "
              f"sparse {sparse:.2f} ms, dense/sparse {dense / sparse:.2f}x")

    for n, block, topk in ((128, 16, 4), (512, 32, 4), (2048, 64, 4)):
        compare(n, block, topk)
