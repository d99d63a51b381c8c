"""Fused all-branch Triton kernels for paper mode: one softmax over every branch's keys.

Paper mode's Eq. 10 output is one softmax over the multiset union of every branch's keys, so
one program can run all branches of its query rows with one online softmax and write out
and lse once: no per-branch merge pass, one launch for the whole plan. Where the schedule nests
(``union``: LongNet's), a pair several branches link is computed once, its probability weighted by
how many do (``class_weights``), so a program skips the keys an earlier branch already covered.

Tiling: with ``L = lcm(rates)`` and a span of ``BLOCK * L`` positions that divides every
segment (or a branch with one segment), a program takes the ``BLOCK`` rows of one residue
class ``c`` modulo ``L`` inside one span. Those rows share one segment of every branch, and
in branch ``(w, r)`` they are all active (``c % r == (head) % r``) or all idle; when active,
their keys are the ``w / r`` rows of that class in the same segment. Backward uses the same
tiling over keys for dK/dV (one program per k/v head, looping over its query heads: no
per-query-head buffers with GQA) and over queries for dQ; every program stores its rows
once. Plans this tiling does not fit (head_groups mode, a segment that is no multiple of the span,
documents shorter than a span) run branch by branch (``triton.Triton``).

Launch order: a tile with every branch active runs several times the keys of one with the fewest,
so the grid runs the heavier residues (``residue_order``) of every span first and ends on the
lightest tiles (NOTES.md v14).

Causal: a tile's rows spread over its whole span, so the diagonal blocks of a branch cover
(s + 1) / s of its causal work (s spans a segment). In a union plan only the first branch has a
diagonal: branch t > 0 skips its keys in the tile's segment of branch t - 1, which holds the tile's
rows, so its other keys are all before them or all after. Such plans run the first branch apart on
consecutive rows, each pair weighted by how many branches link it (``first_apart``, ``links``;
``triton.Triton``), and the rest here from branch 1 (``FROM_BRANCH``): no diagonal anywhere. Causal
plans counted once per branch run fused or branch by branch, whichever timed faster (``pick``).

Packed documents (cu_seqlens) are tiled each from its own first row: a table lists every
span as (document's first row, its length, span start, document index) and the grid's
first axis runs over spans x residues, so all documents take one launch. Positions, not class
indices, address every tensor: row ``p`` of a document starting at row ``p0``, head ``j``, is
at ``b*sb + (p0 + p)*su + j*sh``.
"""

from __future__ import annotations

import functools
import math

import torch

from ..plan import PER_HEAD, Plan, documents
from .triton_launch import Launch, chained, prepared

try:
    import triton
    import triton.language as tl
    import triton.runtime.errors
except ImportError:
    triton = None

if triton is not None:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # a Triton without grid dependency control: launches stay stream-ordered
        gdc_launch_dependents = gdc_wait = None

LOG2E = 1.4426950408889634  # scores in log2 units: exp2 in the kernels
BLOCKS = (128, 64, 32, 16)


@functools.lru_cache(maxsize=256)
def tiling(plan: Plan, n: int, num_heads: int, largest: int) -> int:
    """The largest tile (rows per program, <= ``largest``) the fused kernels can run ``plan`` at
    sequence length n with, or 0 when they cannot (then the plan runs branch by branch).

    Every document (packed with cu_seqlens, or the whole sequence) is tiled from its first row;
    a tile's span must divide each branch's segment there (or the branch has one segment), and
    fit the shortest document (a lone sequence may be shorter than the smallest tile)."""
    if not plan or any(b.offset != PER_HEAD or b.head_start != 0 or b.head_stop != num_heads
                       or (b.head_base, b.kv_group) != (plan[0].head_base, plan[0].kv_group) for b in plan):
        return 0
    docs = documents(plan, n)
    per_doc = list(docs.values())
    if any([b.rate for b in branches] != [b.rate for b in per_doc[0]] for branches in per_doc):
        return 0
    lcm = math.lcm(*(b.rate for b in plan))
    shortest = min(length for _, length in docs)
    for block in BLOCKS:
        span = block * lcm
        if block <= largest and (span <= shortest or (block == BLOCKS[-1] and len(docs) == 1)) and all(
                b.segment >= length or b.segment % span == 0 for (_, length), branches in docs.items()
                for b in branches):
            return block
    return 0


UNION_BLOCK = 64  # the largest key block (forward, dQ) or query block (dK/dV) of any config


@functools.lru_cache(maxsize=256)
def union(plan: Plan, n: int) -> bool:
    """Whether the fused kernels count each (row, key) pair once, weighted by how many branches link it
    (``class_weights``), instead of once per branch. In every document each branch's rate must divide the
    next one's and its segments nest in the next one's (LongNet's schedules): the branches that link a
    pair are then the first that does and some of those after it, and branch t skips its keys in the
    tile's segment of branch t - 1. The rates' lcm must divide 32 (every rate a power of two; the weights
    repeat from block to block, 32 being the smallest key block), and each segment but the last branch's
    must be whole ``UNION_BLOCK`` blocks of the next branch's class rows, or the whole document (what a
    branch skips is whole blocks)."""
    if 32 % math.lcm(*(b.rate for b in plan)):
        return False
    for (_, length), branches in documents(plan, n).items():
        for prev, b in zip(branches, branches[1:]):
            if length and (b.rate % prev.rate or (b.segment % prev.segment and b.segment < length)
                           or (prev.segment % (b.rate * UNION_BLOCK) and prev.segment < length)):
                return False
    return True


@functools.lru_cache(maxsize=256)
def first_apart(plan: Plan, n: int) -> tuple[Plan, bool]:
    """A union plan (``union``) as its first branch in every document, which holds the causal diagonal and
    every pair a later branch also links (run by consecutive rows, weighted: ``triton``'s weighted launches),
    and whether any later branch links keys outside it (run fused, from branch 1: a residue tile's rows then
    see each such key in full, or not at all)."""
    docs = documents(plan, n).items()
    return (tuple(branches[0] for _, branches in docs),
            any(branches[0].segment < length and branches[-1].segment > branches[0].segment
                for (_, length), branches in docs))


def residue_order(plan: Plan, n: int) -> tuple[list[int], int]:
    """Residues u = (c - head) mod lcm in launch order, and how many come first: those whose tiles
    run more than the fewest branches (c % r == head % r for every rate r dividing u), so a launch
    ends on its lightest tiles instead of a few tiles with every branch active."""
    (_, length), branches = next(iter(documents(plan, n).items()))
    lcm = math.lcm(*(b.rate for b in plan))
    work = [sum(min(b.segment, length) / b.rate for b in branches if u % b.rate == 0) for u in range(lcm)]
    heavy = [u for u in range(lcm) if work[u] > min(work)]
    return heavy + [u for u in range(lcm) if work[u] == min(work)], len(heavy)


@functools.lru_cache(maxsize=64)
def _tables(plan: Plan, n: int, block: int, device: torch.device):
    """Device tables (made once per plan, tile and device): each document's branches' (segment,
    rate); each span's (document's first row, its length, span start in it, document index); the
    residues in launch order (``residue_order``); for each residue g modulo the rates' least common
    multiple, how many branches' rates divide g (``class_weights``). Then the number of spans, that
    multiple, the branches per document and the number of heavy residues."""
    docs = documents(plan, n)
    lcm = math.lcm(*(b.rate for b in plan))
    branches = [x for doc in docs.values() for b in doc for x in (b.segment, b.rate)]
    spans = [x for i, (start, length) in enumerate(docs) for span in range(0, length, block * lcm)
             for x in (start, length, span, i)]
    order, heavy = residue_order(plan, n)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    return ((as_tensor(branches), as_tensor(spans), as_tensor(order), as_tensor(_link_counts(plan)[2])),
            len(spans) // 4, lcm, len(next(iter(docs.values()))), heavy)


@functools.lru_cache(maxsize=64)
def links(plan: Plan, device: torch.device) -> tuple[torch.Tensor, int, tuple[int, ...]] | None:
    """For each residue g modulo the rates' least common multiple, how many of a document's branches' rates
    divide g (int32 on the device); that multiple; the rates (what the table is made of: a key for launches
    made with it). None where every count is at most 1 (one branch a document: nothing to weigh). In a union
    plan (``union``) a row and a key of one segment of the first branch, at positions p and p' from the head's
    offset, are linked by min(links[p], links[p']) branches."""
    lcm, rates, counts = _link_counts(plan)
    if max(counts) <= 1:
        return None
    return torch.tensor(counts, dtype=torch.int32, device=device), lcm, rates


def _link_counts(plan: Plan) -> tuple[int, tuple[int, ...], list[int]]:
    """The rates' least common multiple, a document's rates, and for each residue g modulo that multiple how
    many of the rates divide g (``links``, ``class_weights``)."""
    lcm = math.lcm(*(b.rate for b in plan))
    rates = tuple(b.rate for b in plan if b.row_start == plan[0].row_start)
    return lcm, rates, [sum(g % r == 0 for r in rates) for g in range(lcm)]


if triton is not None:

    @triton.jit
    def dot(a, b):
        """a @ b accumulated in float32; float32 operands as 3xTF32, as exact as float32 math (a
        plain TF32 dot, Triton's default, errs about 1e-3)."""
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="tf32x3")
        return tl.dot(a, b)

    @triton.jit
    def _residue_tile(TS, T, NB, RO, HEAVY, BLOCK: tl.constexpr, LCM, HEAD_BASE, HEAD_STEP):
        """This program's head (grid axis 1: query head, or k/v head of query heads HEAD_STEP apart) and
        batch; its document's first row, length and branch table; the span's first position, the residue
        c in the document, and the positions span + c + i * LCM (i < BLOCK) with which of them exist
        (positions count from the document's first row).

        The grid (spans x LCM, heads, batch) is read in launch order as (group, batch, head, span,
        residue): the HEAVY residues ``RO[:HEAVY]`` (relative to the head, ``residue_order``) of every
        batch, head and span first, then the rest; a span's residues stay neighbours (they read the
        same keys)."""
        spans = tl.num_programs(0) // LCM
        heads = tl.num_programs(1)
        linear = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + heads * tl.program_id(2).to(tl.int64))
        first = tl.num_programs(2).to(tl.int64) * heads * spans * HEAVY  # programs of the heavy residues
        light = linear >= first
        idx = tl.where(light, linear - first, linear)
        ranks = tl.where(light, LCM - HEAVY, HEAVY)
        rank = tl.where(light, HEAVY, 0) + idx % ranks
        rest = idx // ranks  # (batch, head, span) of the group
        e = (rest % spans).to(tl.int32)
        rest = rest // spans
        head = (rest % heads).to(tl.int32)
        b = rest // heads
        c = (head * HEAD_STEP + HEAD_BASE + tl.load(RO + rank)) % LCM
        doc0 = tl.load(TS + 4 * e).to(tl.int64)
        n = tl.load(TS + 4 * e + 1)
        span = tl.load(TS + 4 * e + 2)
        pos = span + c + tl.arange(0, BLOCK) * LCM
        return head, b, doc0, n, T + tl.load(TS + 4 * e + 3) * 2 * NB, span, c, pos, pos < n

    @triton.jit
    def _query_side(head, b, doc0, KV_GROUP, qb, qh, qu, kb, kh, ku, mb, mu):
        """Row 0 of a query-tile program's document in q (out, dout, dq), in its k/v head of k (v), and in
        the key mask."""
        return b * qb + head * qh + doc0 * qu, b * kb + (head // KV_GROUP) * kh + doc0 * ku, b * mb + doc0 * mu

    @triton.jit
    def _branch(T, br, span, c, head_g, N):
        """Branch br's class for a tile: whether its rows are active, the class's first position,
        its row count in the tile's segment, and the rate."""
        w = tl.load(T + 2 * br)
        r = tl.load(T + 2 * br + 1)
        o = head_g % r
        seg0 = span // w * w
        count = (tl.minimum(N - seg0, w) - o + r - 1) // r
        return c % r == o, seg0 + o, count, r

    @triton.jit
    def rows_at(ptr, base, pos, ok, su, dims):
        """Rows at positions pos of ptr + base: (len(pos), HEAD_DIM)."""
        return tl.load(ptr + base + pos.to(tl.int64)[:, None] * su + dims[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def kv_rows(K, V, base, kpos, ok, ku, dims, MASKED: tl.constexpr):
        """Key and value rows at positions kpos; MASKED: only those where ok (zeros elsewhere)."""
        offs = base + kpos.to(tl.int64)[:, None] * ku + dims[None, :]
        if MASKED:
            return tl.load(K + offs, mask=ok[:, None], other=0.0), tl.load(V + offs, mask=ok[:, None], other=0.0)
        return tl.load(K + offs), tl.load(V + offs)

    @triton.jit
    def key_block(K, V, base, kpos, ok, start, ku, dims, MASKED: tl.constexpr, TMA: tl.constexpr):
        """The key and value rows of the block from class index start: TMA, through the descriptors
        of ``class_keys`` (rows past the class load as zeros); else at positions kpos (``kv_rows``)."""
        if TMA:
            k, v = K.load([start, 0]), V.load([start, 0])
        else:
            k, v = kv_rows(K, V, base, kpos, ok, ku, dims, MASKED)
        return k, v

    @triton.jit
    def visible_keys(KM, m_base, kpos, ok, mu, HAS_MASK: tl.constexpr):
        if HAS_MASK:
            return ok & (tl.load(KM + m_base + kpos.to(tl.int64) * mu, mask=ok, other=1) == 0)
        return ok

    @triton.jit
    def fwd_block(q, K, V, KM, k_base, m_base, key0, r, count, start, qidx, m_i, l_i, acc, ku, mu, qk_scale, dims,
                  IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr, NEG_SCALE: tl.constexpr,
                  BLOCK_N: tl.constexpr, TMA: tl.constexpr = False, weights=None, WEIGHTED: tl.constexpr = False):
        """One key block of one branch into the running (max, sum, acc); MASKED: check key bounds,
        the key mask and causality (blocks every row sees in full skip that, and take the row maxima
        of the scores before scaling, so scaling and subtracting the maximum are one FMA per score:
        the minima when the scale is negative, NEG_SCALE). WEIGHTED: each pair's probability times its
        multiplicity (``weigh``)."""
        t = start + tl.arange(0, BLOCK_N)
        kpos = key0 + t * r
        ok = t < count
        k, v = key_block(K, V, k_base, kpos, ok, start, ku, dims, MASKED, TMA)
        s = dot(q, tl.trans(k))
        if MASKED:
            keep = visible_keys(KM, m_base, kpos, ok, mu, HAS_MASK)[None, :]
            if IS_CAUSAL:
                keep = keep & (t[None, :] <= qidx[:, None])
            s = tl.where(keep, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if HAS_MASK:  # rows that have seen no visible key yet
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_new[:, None])
        else:
            if NEG_SCALE:
                m_new = tl.maximum(m_i, tl.min(s, 1) * qk_scale)
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        p = weigh(p, weights, WEIGHTED, False)
        alpha = tl.exp2(m_i - m_new)
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + dot(p.to(v.dtype), v)

    @triton.jit
    def class_keys(K, V, base, count, r, ku, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """TMA: tensor descriptors over one class's keys and values (count rows r rows apart from
        base), else K, V themselves."""
        if TMA:
            rows = tl.maximum(count, 1)
            kc = tl.make_tensor_descriptor(K + base, [rows, HEAD_DIM], [r * ku, 1], [BLOCK_N, HEAD_DIM])
            vc = tl.make_tensor_descriptor(V + base, [rows, HEAD_DIM], [r * ku, 1], [BLOCK_N, HEAD_DIM])
        else:
            kc, vc = K, V
        return kc, vc

    @triton.jit
    def _key_blocks(pos, pos0, key0, r, count, LCM, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """For a query tile at positions pos (BLOCK_M rows LCM apart, from pos0) in a branch whose class
        starts at key0 with rate r and count keys: the rows' class indices (causal: the last key each
        sees), where the key blocks that need no mask end, and where all its key blocks end."""
        qidx = (pos - key0) // r
        full, hi = count // BLOCK_N * BLOCK_N, count
        if IS_CAUSAL:
            first = (pos0 - key0) // r
            full = tl.minimum(full, (first + 1) // BLOCK_N * BLOCK_N)
            hi = tl.minimum(count, first + (BLOCK_M - 1) * (LCM // r) + 1)
        if HAS_MASK:
            full = 0
        return qidx, full, hi

    @triton.jit
    def class_weights(T, LK, br, span, c, head_g, N, key0, count, r, LCM, UNION: tl.constexpr, BLOCK: tl.constexpr):
        """Union plans (``union``) count each (row, key) pair once, in the first branch that links it, weighted by
        how many branches do. For branch br of a tile (rows, or keys, of residue c): the class indices
        [skip0, skip1) of its keys (or query rows) in the tile's segment of branch br - 1, whose pairs an
        earlier branch counted, and the weights of BLOCK class indices from any block start: position p and
        the tile are linked by the first min(LK[p - head], LK[c - head]) branches (each rate divides the
        next; residues modulo LCM), br of them before this one. Other plans: nothing skipped, weights unused."""
        skip0, skip1, weights = 0, 0, 1.0
        if UNION:
            prev = tl.load(T + 2 * tl.maximum(br - 1, 0))
            p0 = span // prev * prev
            skip0 = tl.where(br > 0, (p0 - key0 + r - 1) // r, 0)
            skip1 = tl.where(br > 0, tl.minimum((tl.minimum(p0 + prev, N) - key0 + r - 1) // r, count), 0)
            pos = key0 + tl.arange(0, BLOCK) * r
            links = tl.minimum(tl.load(LK + ((pos - head_g) & (LCM - 1))), tl.load(LK + ((c - head_g) & (LCM - 1))))
            weights = (links - br).to(tl.float32)
        return skip0, skip1, weights

    @triton.jit
    def kept(y, skip0, skip1):
        """How many class indices below y are not skipped (``class_weights``): the loops run over these."""
        return y - (tl.minimum(tl.maximum(y, skip0), skip1) - skip0)

    @triton.jit
    def unskipped(x, skip0, skip1):
        """The class index of the x-th one not skipped (block starts: the skipped range is whole blocks)."""
        return tl.where(x >= skip0, x + skip1 - skip0, x)

    @triton.jit
    def weigh(x, weights, WEIGHTED: tl.constexpr, BY_ROWS: tl.constexpr):
        """A (query rows, keys) tile x times each pair's multiplicity. WEIGHTED 2: weights holds the tile's
        (a launch of a union plan's first branch, ``triton._pair_links``); else (WEIGHTED) the keys' (a residue
        tile of query rows, ``class_weights``) or, BY_ROWS, the rows' (a residue tile of keys)."""
        if WEIGHTED == 2:
            x = x * weights
        elif WEIGHTED:
            if BY_ROWS:
                x = x * weights[:, None]
            else:
                x = x * weights[None, :]
        return x

    @triton.jit
    def _fused_fwd(Q, K, V, O, L, KM, T, TS, RO, LK, NB, HEAVY, qb, qh, qu, kb, kh, ku, lb, lh, lu, mb, mu, LCM,
                   HEAD_BASE, KV_GROUP, qk_scale, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   NEG_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   TMA: tl.constexpr = False, UNION: tl.constexpr = False, FROM_BRANCH: tl.constexpr = 0,
                   CHAIN: tl.constexpr = False):
        """FROM_BRANCH: run the branches from this one (1: a causal union plan's first branch runs apart,
        ``triton.Triton``). CHAIN: the launch after this one (that first branch's, which merges into out and lse
        only once this one has finished) may start while this one runs."""
        if CHAIN:
            gdc_launch_dependents()
        head, b, doc0, N, T, span, c, pos, row_ok = _residue_tile(TS, T, NB, RO, HEAVY, BLOCK_M, LCM, HEAD_BASE, 1)
        if span + c >= N:
            return
        q_base, k_base, m_base = _query_side(head, b, doc0, KV_GROUP, qb, qh, qu, kb, kh, ku, mb, mu)
        dims = tl.arange(0, HEAD_DIM)
        q = rows_at(Q, q_base, pos, row_ok, qu, dims)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for br in range(FROM_BRANCH, NB):
            active, key0, count, r = _branch(T, br, span, c, head + HEAD_BASE, N)
            if active:
                qidx, full, hi = _key_blocks(pos, span + c, key0, r, count, LCM, IS_CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N)
                kc, vc = class_keys(K, V, k_base + key0.to(tl.int64) * ku, count, r, ku, TMA, BLOCK_N, HEAD_DIM)
                skip0, skip1, weights = class_weights(T, LK, br, span, c, head + HEAD_BASE, N, key0, count, r, LCM,
                                                      UNION, BLOCK_N)
                for x in range(0, kept(full, skip0, skip1), BLOCK_N):
                    m_i, l_i, acc = fwd_block(q, kc, vc, KM, k_base, m_base, key0, r, count, unskipped(x, skip0, skip1),
                                              qidx, m_i, l_i, acc, ku, mu, qk_scale, dims, IS_CAUSAL, HAS_MASK, False,
                                              NEG_SCALE, BLOCK_N, TMA, weights, UNION)
                for x in range(kept(full, skip0, skip1), kept(hi, skip0, skip1), BLOCK_N):
                    m_i, l_i, acc = fwd_block(q, kc, vc, KM, k_base, m_base, key0, r, count, unskipped(x, skip0, skip1),
                                              qidx, m_i, l_i, acc, ku, mu, qk_scale, dims, IS_CAUSAL, HAS_MASK, True,
                                              NEG_SCALE, BLOCK_N, TMA, weights, UNION)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        offs = q_base + pos.to(tl.int64)[:, None] * qu + dims[None, :]
        tl.store(O + offs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))  # natural log
        tl.store(L + b * lb + head * lh + (doc0 + pos) * lu, lse, mask=row_ok)

    @triton.jit
    def probs(q, k, v, do, lse, delta, rows, cols, row_ok, col_keep, qk_scale, do_scale, Q_SHIFT,
              IS_CAUSAL: tl.constexpr):
        """P against the merged lse (log2 units) and dS of one (query block, key block) tile.

        col_keep: visible keys; do_scale: the output's factor (1/m in head_groups mode), which scales
        dO; causal: query row i sees key rows <= i + Q_SHIFT (rows, cols: class indices)."""
        s = dot(q, tl.trans(k)) * qk_scale
        keep = row_ok[:, None] & col_keep[None, :]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + Q_SHIFT)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = dot(do, tl.trans(v)) * do_scale
        return p, p * (dp - delta[:, None])

    @triton.jit
    def row_stats(L, D, base, pos, ok, lu):
        """lse (log2 units) and delta of the rows at these positions."""
        offs = base + pos.to(tl.int64) * lu
        return tl.load(L + offs, mask=ok, other=0.0) * 1.4426950408889634, tl.load(D + offs, mask=ok, other=0.0)

    @triton.jit
    def dq_block(q, do, lse, delta, K, V, KM, k_base, m_base, key0, r, count, start, qidx, row_ok, dq, ku, mu,
                 qk_scale, do_scale, dims, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                 BLOCK_N: tl.constexpr, TMA: tl.constexpr = False, weights=None, WEIGHTED: tl.constexpr = False):
        """dq += dS K over one key block (keys key0 + t*r); MASKED and WEIGHTED as in ``fwd_block`` (rows
        that do not exist load zeros, so their dS is 0 either way)."""
        t = start + tl.arange(0, BLOCK_N)
        kpos = key0 + t * r
        ok = t < count
        k, v = key_block(K, V, k_base, kpos, ok, start, ku, dims, MASKED, TMA)
        if MASKED:
            keep = visible_keys(KM, m_base, kpos, ok, mu, HAS_MASK)
            p, ds = probs(q, k, v, do, lse, delta, qidx, t, row_ok, keep, qk_scale, do_scale, 0, IS_CAUSAL)
            ds = weigh(ds, weights, WEIGHTED, False)
        else:
            p = tl.exp2(dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            p = weigh(p, weights, WEIGHTED, False)
            ds = p * (dot(do, tl.trans(v)) * do_scale - delta[:, None])
        return dq + dot(ds.to(k.dtype), k)

    @triton.jit
    def _fused_dq(Q, K, V, DO, L, D, KM, DQ, T, TS, RO, LK, NB, HEAVY, qb, qh, qu, kb, kh, ku, lb, lh, lu, mb, mu, LCM,
                  HEAD_BASE, KV_GROUP, qk_scale, scale, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr = False,
                  CHAIN: tl.constexpr = False, UNION: tl.constexpr = False, FROM_BRANCH: tl.constexpr = 0):
        """CHAIN: launched while the dK/dV launch before it runs (it reads nothing that one writes); every
        program waits for that launch before it ends, so this launch ends after it (``backward``); the launch
        after it may start while it runs (a causal union plan's first branch's, which adds into the gradients
        only once this one has finished). FROM_BRANCH as in ``_fused_fwd``."""
        if CHAIN:
            gdc_launch_dependents()
        head, b, doc0, N, T, span, c, pos, row_ok = _residue_tile(TS, T, NB, RO, HEAVY, BLOCK_M, LCM, HEAD_BASE, 1)
        if span + c >= N:
            if CHAIN:
                gdc_wait()
            return
        q_base, k_base, m_base = _query_side(head, b, doc0, KV_GROUP, qb, qh, qu, kb, kh, ku, mb, mu)
        dims = tl.arange(0, HEAD_DIM)
        q = rows_at(Q, q_base, pos, row_ok, qu, dims)
        do = rows_at(DO, q_base, pos, row_ok, qu, dims)
        lse, delta = row_stats(L, D, b * lb + head * lh + doc0 * lu, pos, row_ok, lu)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for br in range(FROM_BRANCH, NB):
            active, key0, count, r = _branch(T, br, span, c, head + HEAD_BASE, N)
            if active:
                qidx, full, hi = _key_blocks(pos, span + c, key0, r, count, LCM, IS_CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N)
                kc, vc = class_keys(K, V, k_base + key0.to(tl.int64) * ku, count, r, ku, TMA, BLOCK_N, HEAD_DIM)
                skip0, skip1, weights = class_weights(T, LK, br, span, c, head + HEAD_BASE, N, key0, count, r, LCM,
                                                      UNION, BLOCK_N)
                for x in range(0, kept(full, skip0, skip1), BLOCK_N):
                    dq = dq_block(q, do, lse, delta, kc, vc, KM, k_base, m_base, key0, r, count,
                                  unskipped(x, skip0, skip1), qidx, row_ok, dq, ku, mu, qk_scale, 1.0, dims, IS_CAUSAL,
                                  HAS_MASK, False, BLOCK_N, TMA, weights, UNION)
                for x in range(kept(full, skip0, skip1), kept(hi, skip0, skip1), BLOCK_N):
                    dq = dq_block(q, do, lse, delta, kc, vc, KM, k_base, m_base, key0, r, count,
                                  unskipped(x, skip0, skip1), qidx, row_ok, dq, ku, mu, qk_scale, 1.0, dims, IS_CAUSAL,
                                  HAS_MASK, True, BLOCK_N, TMA, weights, UNION)
        if CHAIN:
            gdc_wait()
        tl.store(DQ + q_base + pos.to(tl.int64)[:, None] * qu + dims[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def dkdv_block(Q, DO, L, D, q_base, l_base, key0, r, count, start, k, v, kidx, col_keep, dk, dv, qu, lu,
                   qk_scale, do_scale, q_shift, dims, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK_M: tl.constexpr, weights=None, WEIGHTED: tl.constexpr = False):
        """dk, dv += one block of the class's query rows (class indices start + i, at key0 + i r) against
        the tile's keys (class indices kidx, used only when IS_CAUSAL: row i sees keys <= i + q_shift).
        dv comes without do_scale (the caller scales it once). Rows past the class load as zeros and
        add nothing, so only the key mask and causality mask P. WEIGHTED: each pair's probability times
        its multiplicity (``weigh``)."""
        u = start + tl.arange(0, BLOCK_M)
        qpos = key0 + u * r
        row_ok = u < count
        q = rows_at(Q, q_base, qpos, row_ok, qu, dims)
        do = rows_at(DO, q_base, qpos, row_ok, qu, dims)
        lse, delta = row_stats(L, D, l_base, qpos, row_ok, lu)
        if IS_CAUSAL:
            p, ds = probs(q, k, v, do, lse, delta, u, kidx, row_ok, col_keep, qk_scale, do_scale, q_shift, True)
            p, ds = weigh(p, weights, WEIGHTED, True), weigh(ds, weights, WEIGHTED, True)
        else:
            p = tl.exp2(dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            if HAS_MASK:  # a row whose keys are all masked has lse -inf: P is 0 on its masked keys
                p = tl.where(col_keep[None, :], p, 0.0)
            p = weigh(p, weights, WEIGHTED, True)
            ds = p * (dot(do, tl.trans(v)) * do_scale - delta[:, None])
        return dk + dot(tl.trans(ds.to(q.dtype)), q), dv + dot(tl.trans(p.to(do.dtype)), do)

    @triton.jit
    def _fused_dkdv(Q, K, V, DO, L, D, KM, DK, DV, T, TS, RO, LK, NB, HEAVY, qb, qh, qu, kb, kh, ku, lb, lh, lu, mb, mu,
                    LCM, HEAD_BASE, KV_GROUP, qk_scale, scale, IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, CHAIN: tl.constexpr = False,
                    UNION: tl.constexpr = False, FROM_BRANCH: tl.constexpr = 0):
        """dK, dV of BLOCK_N keys (a residue tile) over query blocks of BLOCK_M. Keys past n and
        query rows past the class (zeros) add nothing that is stored, so only the key mask masks P
        (and causality, on the query blocks that cross the tile's keys). CHAIN: the dQ launch after
        this one may start at once. FROM_BRANCH as in ``_fused_fwd``."""
        if CHAIN:
            gdc_launch_dependents()
        kv_head, b, doc0, N, T, span, c, kpos, col_ok = _residue_tile(TS, T, NB, RO, HEAVY, BLOCK_N, LCM, HEAD_BASE,
                                                                      KV_GROUP)
        if span + c >= N:
            return
        dims = tl.arange(0, HEAD_DIM)
        k_base = b * kb + kv_head * kh + doc0 * ku
        k, v = kv_rows(K, V, k_base, kpos, col_ok, ku, dims, True)
        col_keep = visible_keys(KM, b * mb + doc0 * mu, kpos, col_ok, mu, HAS_MASK)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for g in range(KV_GROUP):  # the query heads sharing this k/v head
            head = kv_head * KV_GROUP + g
            q_base = b * qb + head * qh + doc0 * qu
            l_base = b * lb + head * lh + doc0 * lu
            for br in range(FROM_BRANCH, NB):
                active, key0, count, r = _branch(T, br, span, c, head + HEAD_BASE, N)
                if active:
                    lo, mid, kidx = 0, 0, kpos  # query blocks [lo, mid) cross this tile's keys (causal)
                    if IS_CAUSAL:
                        first = (span + c - key0) // r
                        lo = first // BLOCK_M * BLOCK_M
                        mid = tl.minimum(tl.cdiv(first + (BLOCK_N - 1) * (LCM // r), BLOCK_M) * BLOCK_M, count)
                        kidx = (kpos - key0) // r
                    skip0, skip1, weights = class_weights(T, LK, br, span, c, head + HEAD_BASE, N, key0, count, r,
                                                          LCM, UNION, BLOCK_M)
                    for x in range(kept(lo, skip0, skip1), kept(mid, skip0, skip1), BLOCK_M):
                        dk, dv = dkdv_block(Q, DO, L, D, q_base, l_base, key0, r, count, unskipped(x, skip0, skip1), k,
                                            v, kidx, col_keep, dk, dv, qu, lu, qk_scale, 1.0, 0, dims, True, HAS_MASK,
                                            BLOCK_M, weights, UNION)
                    for x in range(kept(mid, skip0, skip1), kept(count, skip0, skip1), BLOCK_M):
                        dk, dv = dkdv_block(Q, DO, L, D, q_base, l_base, key0, r, count, unskipped(x, skip0, skip1), k,
                                            v, kpos, col_keep, dk, dv, qu, lu, qk_scale, 1.0, 0, dims, False, HAS_MASK,
                                            BLOCK_M, weights, UNION)
        offs = k_base + kpos.to(tl.int64)[:, None] * ku + dims[None, :]
        tl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


def _strides(q, k, lse, mask):
    """(batch, head, row) strides of q (also out, dout, dq), k (also v, dk, dv), lse (also delta);
    (batch, row) of the key mask."""
    (qb, qu, qh, _), (kb, ku, kh, _), (lb, lu, lh) = q.stride(), k.stride(), lse.stride()
    return qb, qh, qu, kb, kh, ku, lb, lh, lu, *(mask.stride() if mask is not None else (0, 0))




def fwd_configs(d: int, dtype: torch.dtype) -> tuple[tuple[int, int, int, int], ...]:
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of the fused forward, timed once per kind of
    call on the device (``pick``): with plain plans 8 warps ran 5-7% faster than 4 on some H100
    hosts and 10-15% slower on another, and 1.1-1.6x slower with GQA or a key mask (NOTES.md, v7);
    on an H200 8 warps ran 1.3x slower and 4 stages 2% faster than 3 (v31). float32 tiles take twice the
    shared memory: 2 stages."""
    if dtype == torch.float32:
        return (128, 64, 8, 2), (128, 32, 4, 2)
    return (128, 64, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4)


TMA_MIN_ROWS = 32768  # key rows (b x n) below which a call is host-bound: the scratch allocation costs more


def tma_loads(k, v) -> bool:
    """Whether the kernels load k and v through tensor descriptors (TMA): on sm_90 and newer, 16-bit
    inputs (float32 keeps pointer loads: not measured), 16-byte aligned bases and row strides, at least
    ``TMA_MIN_ROWS`` key rows (8 x 1K ran 3% slower: the descriptors' scratch allocation on the host).
    The forward takes them always, dQ when causal (NOTES.md v17). Descriptors made in a kernel need
    scratch memory: where no Triton allocator is set, torch's is set as Triton's."""
    if k.dtype == torch.float32 or not k.is_cuda or k.numel() < TMA_MIN_ROWS * k.shape[-2] * k.shape[-1] \
            or not _has_tma(k.device.index) or any(
                t.data_ptr() % 16 or t.stride(-1) != 1 or any(s * t.element_size() % 16 for s in t.stride()[:-1])
                for t in (k, v)):
        return False
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
    return True


@functools.lru_cache(maxsize=None)
def _has_tma(device: int | None) -> bool:
    """sm_90 or newer, and a Triton with in-kernel tensor descriptors and a scratch allocator to set."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator  # noqa: F401
    except ImportError:
        return False
    return hasattr(tl, "make_tensor_descriptor") and torch.cuda.get_device_capability(device)[0] >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Triton's scratch memory for in-kernel tensor descriptors, from torch's caching allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


_PICKED: dict = {}


def pick(key, candidates, launch, rounds: int = 3):
    """The candidate whose ``launch(candidate)`` ran fastest for this key: each is launched once to
    compile, then timed with CUDA events over two launches in each of ``rounds`` rounds that take the
    candidates in turn, keeping each one's best round (a round slowed by clocks settling or another
    process counts for nothing), once per key and process; one that does not fit the device (shared
    memory, registers) is passed over. The first candidate, untimed, off CUDA (the interpreter) and
    while a CUDA graph is being captured."""
    key = (key, candidates)
    if key not in _PICKED:
        if len(candidates) == 1 or not torch.cuda.is_available() or torch.cuda.is_current_stream_capturing():
            return candidates[0]
        times = {}
        for cfg in candidates:
            try:
                launch(cfg)
                times[cfg] = float("inf")
            except triton.runtime.errors.OutOfResources:
                pass
        for _ in range(rounds):
            for cfg in times:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(2):
                    launch(cfg)
                end.record()
                end.synchronize()
                times[cfg] = min(times[cfg], start.elapsed_time(end))
        _PICKED[key] = min(times, key=times.get)
    return _PICKED[key]


def bwd_configs(d: int, dtype: torch.dtype, causal: bool, masked: bool):
    """((dK/dV keys per program, its query block, num_warps, num_stages), (dQ rows per program, its
    key block, num_warps, num_stages)); rows per program at most (the plan's tiling may take fewer).
    Plain non-causal d = 64: dQ on 128 rows over 8 warps (NOTES.md v15: 4.36 vs 4.77 ms at 128K;
    with a key mask 8 warps ran slower); causal dQ on 64 rows and 32 keys (0.39 vs 0.45 ms at 8 x 2K)."""
    if dtype == torch.float32:  # NOTES.md v12: 128K, d = 64, 150.6 vs 264.3 ms with (64, 64, 64, 64, 8, 2)
        return (32, 64, 4, 2), (64, 32, 4, 2)
    if d > 64:
        return (64, 64, 8, 2), (64, 64, 8, 2)
    if causal:
        return (64, 64, 4, 3), (64, 32, 4, 3)
    return (64, 64, 4, 3), ((64, 64, 4, 3) if masked else (128, 32, 8, 3))


def _fused_runs(d: int, dtype: torch.dtype) -> bool:
    """float32 at d = 128 runs branch by branch: its per-branch launches beat every fused config timed
    (NOTES.md v12, 16K: forward 9.1 against the fused best 10.6 ms; forward+backward: the fused best
    68.2 ms, per-branch 86.1 ms with a backward config the one now in use runs in half the time)."""
    return not (dtype == torch.float32 and d > 64)


def fwd_tile(plan: Plan, n: int, h: int, d: int, dtype: torch.dtype) -> int:
    """Rows per program of the fused forward for this plan, or 0: run it branch by branch."""
    return tiling(plan, n, h, min(cfg[0] for cfg in fwd_configs(d, dtype))) if _fused_runs(d, dtype) else 0


def bwd_tiles(plan: Plan, n: int, h: int, d: int, dtype: torch.dtype, causal: bool, masked: bool):
    """``bwd_configs`` with the plan's tile sizes (at most one warp per 16 rows of a tile), or None:
    run it branch by branch."""
    if not _fused_runs(d, dtype):
        return None
    kv, dq = bwd_configs(d, dtype, causal, masked)
    kv_tile, dq_tile = tiling(plan, n, h, kv[0]), tiling(plan, n, h, dq[0])
    if not (kv_tile and dq_tile):
        return None
    return tuple((tile, keys_or_rows, min(warps, max(4, tile // 16)), stages)
                 for (_, keys_or_rows, warps, stages), tile in ((kv, kv_tile), (dq, dq_tile)))


def forward(q, k, v, plan: Plan, scale: float, causal: bool, key_mask, block_m: int, from_branch: int = 0,
            chain: bool = False):
    """q: (b, n, h, d), k, v: (b, n, h_kv, d) contiguous; key_mask (b, n) bool or None; block_m from
    ``fwd_tile`` -> out (b, n, h, d) in q.dtype, lse (b, n, h) float32, over the plan's branches from
    ``from_branch`` on (``_fused_fwd``). chain (sm_90, ``triton._chains``): the next launch may start while this
    one runs (``chained``). The launch (grid, tables, scalars, the config ``pick`` chose) is made once per call
    geometry (``prepared``)."""
    b, n, h, d = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((b, n, h), dtype=torch.float32, device=q.device)
    mask = q if key_mask is None else key_mask.view(torch.uint8)
    tma = tma_loads(k, v)

    def build():
        tables, count, lcm, nb, heavy = _tables(plan, n, block_m, q.device)
        scalars = (nb, heavy, *_strides(q, k, lse, key_mask), lcm, plan[0].head_base, plan[0].kv_group, scale * LOG2E)
        meta = chained(dict(IS_CAUSAL=causal, HAS_MASK=key_mask is not None, NEG_SCALE=scale < 0, BLOCK_M=block_m,
                            HEAD_DIM=d, TMA=tma, UNION=union(plan, n), FROM_BRANCH=from_branch), 0, chain)

        def launch(cfg):
            return Launch(_fused_fwd, (count * lcm, h, b), scalars,
                          dict(meta, BLOCK_N=cfg[1], num_warps=cfg[2], num_stages=cfg[3]))

        key = (d, causal, key_mask is not None, plan[0].kv_group, nb, lcm, block_m, meta["UNION"], from_branch, q.dtype,
               q.device)
        cfg = pick(key, fwd_configs(d, q.dtype), lambda cfg: launch(cfg)((q, k, v, out, lse, mask, *tables)))
        return tables, launch(cfg)

    key = ("fused forward", plan, q.shape, k.shape, None if key_mask is None else key_mask.stride(), q.dtype, q.device,
           scale, causal, block_m, tma, from_branch, chain)
    tables, launch = prepared(key, build)
    launch((q, k, v, out, lse, mask, *tables))
    return out, lse


def backward(dout, q, k, v, lse, delta, plan: Plan, scale: float, causal: bool, key_mask, configs,
             chain: bool = False, from_branch: int = 0):
    """Gradients of ``forward`` (contiguous inputs; delta = rowsum(dout * out), laid out like lse):
    dq, dk, dv in q.dtype, over the branches from ``from_branch`` on. ``configs``: from ``bwd_tiles``. The two
    launches are made once per call geometry (``prepared``). chain (sm_90, ``triton._chains``): the dQ launch,
    which reads nothing dK/dV writes, starts while dK/dV runs (programmatic dependent launch) and ends after
    it."""
    b, n, h, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    km = q if key_mask is None else key_mask.view(torch.uint8)
    tma = causal and tma_loads(k, v)

    def build():
        strides = _strides(q, k, lse, key_mask)
        tail = (plan[0].head_base, plan[0].kv_group, scale * LOG2E, scale)

        def launch(i, kernel, tile, heads, tile_m, tile_n, warps, stages, **extra):  # (tables, Launch)
            tables, count, lcm, nb, heavy = _tables(plan, n, tile, q.device)
            return tables, Launch(
                kernel, (count * lcm, heads, b), (nb, heavy, *strides, lcm, *tail),
                chained(dict(IS_CAUSAL=causal, HAS_MASK=key_mask is not None, BLOCK_M=tile_m, BLOCK_N=tile_n,
                             HEAD_DIM=d, UNION=union(plan, n), FROM_BRANCH=from_branch, num_warps=warps,
                             num_stages=stages, **extra), i, chain))

        (kv_tile, kv_queries, kv_warps, kv_stages), (dq_tile, dq_keys, dq_warps, dq_stages) = configs
        return (launch(0, _fused_dkdv, kv_tile, k.shape[2], kv_queries, kv_tile, kv_warps, kv_stages),
                launch(1, _fused_dq, dq_tile, h, dq_tile, dq_keys, dq_warps, dq_stages, TMA=tma))

    key = ("fused backward", plan, q.shape, k.shape, None if key_mask is None else key_mask.stride(), q.dtype,
           q.device, scale, causal, configs, tma, chain, from_branch)
    (kv_tables, kv_launch), (q_tables, q_launch) = prepared(key, build)
    kv_launch((q, k, v, dout, lse, delta, km, dk, dv, *kv_tables))
    q_launch((q, k, v, dout, lse, delta, km, dq, *q_tables))
    return dq, dk, dv
