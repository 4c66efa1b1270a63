"""Triton compressor pooling, indexer top-k and sparse shared-K=V attention with sink vs the reference (fp32)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dsv4.kernels.cuda.attention import topk_select

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("shape", "empty_from"),
    [((4, 8, 20), 3), ((2, 3, 5, 12), None), ((2, 8, 200), 7), ((0, 8, 16), None), ((3, 1, 9), None)],
    ids=["partial-block", "odd-slots", "wide", "no-blocks", "one-slot"],
)
def test_compress_pool(impls, device, shape, empty_from):
    ref, cuda = impls("compress_pool")
    torch.manual_seed(0)
    kv, score = torch.randn(shape, device=device), torch.randn(shape, device=device) * 3
    if empty_from is not None:  # empty slots: kv 0, score -inf
        kv[..., empty_from:, :] = 0
        score[..., empty_from:, :] = float("-inf")
    torch.testing.assert_close(cuda(kv, score), ref(kv, score), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("m", "c", "overlap"), [(8, 20, False), (4, 12, True), (128, 16, False)], ids=["hca", "csa", "hca-128"]
)
def test_compress_pool_slots_reads_only_complete_rows(impls, device, m, c, overlap):
    """The decode step's pooling, in place over the pool's states: each complete row's block pooled as
    `compress_pool` pools it (CSA: the previous block's first channels, the current block's last), zeros in the
    other rows, whose states (NaN here) are never read; a slot may appear in several rows."""
    ref, cuda = impls("compress_pool_slots")
    torch.manual_seed(3)
    coff = 2 if overlap else 1
    kv = torch.randn(7, coff * m, coff * c, device=device)
    score = torch.randn(7, coff * m, coff * c, device=device) * 3
    score[1, -1] = float("-inf")  # an empty slot (kv 0)
    kv[1, -1] = 0.0
    slots = torch.tensor([1, 4, 0, 6, 4, 2], device=device)
    complete = torch.tensor([True, True, False, True, True, False], device=device)
    kv[[0, 2]] = float("nan")  # the slots of the incomplete rows only
    score[[0, 2]] = float("nan")
    got = cuda(kv, score, slots, complete, overlap)
    assert got.shape == (6, c) and not got.isnan().any()
    torch.testing.assert_close(got, ref(kv, score, slots, complete, overlap), atol=1e-6, rtol=1e-5)
    assert torch.equal(got[~complete], torch.zeros(2, c, device=device))
    b = kv[slots[complete]], score[slots[complete]]
    if overlap:
        b = tuple(torch.cat([t[:, :m, :c], t[:, m:, c:]], dim=1) for t in b)
    torch.testing.assert_close(got[complete], impls("compress_pool")[0](*b), atol=1e-6, rtol=1e-5)
    assert cuda(kv, score, slots[:0], complete[:0], overlap).shape == (0, c)


def _scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    s = (torch.einsum("bshd,bed->bshe", q.double(), keys.double()).relu() * w.double()[..., None]).sum(2)
    return s.masked_fill(torch.arange(keys.shape[1], device=q.device) >= visible[..., None], float("-inf"))


def _assert_same_selection(got: torch.Tensor, want: torch.Tensor, scores: torch.Tensor, visible: torch.Tensor) -> None:
    """Equal up to order and ties: same count of -1, distinct visible picks, the same multiset of scores."""
    assert got.shape == want.shape and got.dtype == torch.int64
    for pos in itertools.product(*(range(n) for n in got.shape[:-1])):
        g, w, vis = got[pos], want[pos], int(visible[pos])
        assert int((g == -1).sum()) == int((w == -1).sum()), (pos, g, w)
        gv, wv = g[g >= 0], w[w >= 0]
        assert bool((gv < vis).all()) and gv.unique().numel() == gv.numel(), (pos, g)
        torch.testing.assert_close(scores[pos][gv].sort().values, scores[pos][wv].sort().values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("b", "s", "hi", "d", "e", "topk", "visible"),
    [
        (2, 3, 4, 16, 5, 8, [[0, 2, 5], [1, 3, 4]]),  # fewer entries than top-k, ragged visibility
        (1, 2, 5, 20, 1500, 16, [[1500, 700]]),  # several radix-select blocks, odd head count and dim
        (2, 1, 16, 32, 40, 4, [[40], [0]]),  # decode rows, one with nothing visible
        (1, 2, 3, 16, 0, 4, [[0, 0]]),  # no compressed entries yet
    ],
    ids=["fewer-than-topk", "long", "decode", "empty"],
)
def test_indexer_topk(impls, device, b, s, hi, d, e, topk, visible):
    ref, cuda = impls("indexer_topk")
    torch.manual_seed(1)
    q, keys = torch.randn(b, s, hi, d, device=device), torch.randn(b, e, d, device=device)
    w = torch.randn(b, s, hi, device=device) * (d * hi) ** -0.5
    vis = torch.tensor(visible, device=device)
    got, want = cuda(q, w, keys, vis, topk), ref(q, w, keys, vis, topk)
    assert got.shape == (b, s, min(topk, e))
    _assert_same_selection(got, want, _scores(q, w, keys, vis), vis)


def test_topk_select_gives_ties_to_the_lower_index(device):
    scores = torch.tensor([[3.0, 1.0, 3.0, 3.0, 0.0, 3.0, -2.0], [0.0, 0.0, 0.0, -1.0, 5.0, 0.0, 0.0]], device=device)
    got = topk_select(scores, torch.tensor([7, 7], device=device), 3)
    assert sorted(got[0].tolist()) == [0, 2, 3]
    assert sorted(got[1].tolist()) == [0, 1, 4]
    negative = torch.tensor([[-0.0, 0.0, -1e-30, -3.5, float("-inf"), 2.0]], device=device)
    assert sorted(topk_select(negative, torch.tensor([6], device=device), 4)[0].tolist()) == [0, 1, 2, 5]
    signed_zeros = torch.tensor([[1.0, 0.0, -0.0, 0.0]], device=device)  # -0.0 ties with +0.0
    assert sorted(topk_select(signed_zeros, torch.tensor([4], device=device), 2)[0].tolist()) == [0, 1]
    assert sorted(topk_select(-signed_zeros, torch.tensor([4], device=device), 2)[0].tolist()) == [1, 2]


def test_indexer_topk_ties_go_to_the_lower_entry_in_prefill_and_decode_rows(impls, device):
    """Repeated keys score exactly alike: every query row, whatever its shape, keeps the lowest-indexed copies."""
    torch.manual_seed(4)
    base = torch.randn(1, 3, 16, device=device)
    keys = base[:, [0, 1, 0, 1, 0, 1, 2, 2]]  # two keys alternating: the third pick always has a twin
    q = torch.randn(1, 5, 4, 16, device=device)
    w = torch.randn(1, 5, 4, device=device).abs()
    visible = torch.tensor([[8, 8, 6, 5, 4]], device=device)
    scores = _scores(q, w, keys, visible)[0]
    for impl in impls("indexer_topk"):
        prefill = impl(q, w, keys, visible, 3)
        for s in range(5):
            vis = int(visible[0, s])
            want = sorted(sorted(range(vis), key=lambda e: (-float(scores[s, e]), e))[:3])
            assert (scores[s, :vis] == scores[s, want].min()).sum() > 1, "the case needs a tie at the k-th score"
            assert sorted(prefill[0, s].tolist()) == want, (impl, s)
            decode = impl(q[:, s : s + 1], w[:, s : s + 1], keys, visible[:, s : s + 1], 3)
            assert sorted(decode[0, 0].tolist()) == want, (impl, s)


def _idx(b: int, s: int, k: int, n: int, device: torch.device) -> torch.Tensor:
    """[B, S, K] distinct entries per query (as the model builds them), about 30% of the slots -1."""
    rows = torch.rand(b, s, max(n, k)).argsort(-1)[..., :k]
    idx = torch.where(rows < n, rows, -1).to(device)
    return torch.where(torch.rand(b, s, k, device=device) < 0.3, -1, idx)


@pytest.mark.parametrize(
    ("b", "s", "h", "d", "n", "k"),
    [(2, 3, 5, 24, 10, 20), (1, 2, 20, 64, 30, 7), (3, 1, 4, 128, 40, 36), (2, 2, 4, 32, 5, 0)],
    ids=["ragged", "two-head-blocks", "decode", "no-index"],
)
def test_sparse_attention(impls, device, b, s, h, d, n, k):
    ref, cuda = impls("sparse_attention")
    torch.manual_seed(2)
    q, kv = torch.randn(b, s, h, d, device=device), torch.randn(b, n, d, device=device)
    idx, sink = _idx(b, s, k, n, device), torch.randn(h, device=device) * 2
    if k:
        idx[0, 0] = -1  # a query with an empty window and no compressed entry
    out = cuda(q, kv, idx, sink, d**-0.5)
    if k == 0:  # the contract: no valid entry gives 0 (the reference cannot reshape an empty index list)
        assert out.shape == q.shape and bool((out == 0).all())
        return
    torch.testing.assert_close(out, ref(q, kv, idx, sink, d**-0.5), atol=1e-5, rtol=1e-5)
    assert bool((out[0, 0] == 0).all())


@pytest.mark.parametrize("sink_value", [30.0, -30.0])
def test_sparse_attention_sink_extremes(impls, device, sink_value):
    ref, cuda = impls("sparse_attention")
    torch.manual_seed(3)
    q, kv = torch.randn(1, 2, 3, 16, device=device), torch.randn(1, 6, 16, device=device)
    idx, sink = _idx(1, 2, 6, 6, device), torch.full((3,), sink_value, device=device)
    torch.testing.assert_close(cuda(q, kv, idx, sink, 0.25), ref(q, kv, idx, sink, 0.25), atol=1e-6, rtol=1e-5)
