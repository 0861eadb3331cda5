"""Fused KIVI decode attention (``kvkernels.kivi_attention``) against the PyTorch reference (dequantize everything
in fp32 with ``refimpl.quant``, then ``refimpl.attention.decode_attention``).

Caches are built by :class:`refimpl.kivi.KIVICache` itself, at token counts that hit every case of the layout:
nothing quantized yet (T < R), T a multiple of R (no fp keys), odd T, the "mid-step" state a fused decode sees
(append done, flush not yet: R fp keys, R + 1 fp values), GQA groups 1/2/3, odd split counts and more splits than
tiles, head dims 32/64/96/128, bits 2/4/8.

Tolerances (kernel vs the fp32 reference rounded to the input dtype): fp32 1e-5 abs / 1e-5 rel (different
summation order only); fp16 2e-3 / 2e-3 and bf16 1.6e-2 / 1.6e-2 (one rounding of the output; everything inside
the kernel is fp32).  Log-sum-exp: 2e-4 abs / 1e-5 rel.
"""

from __future__ import annotations

import sys

import kvkernels.kivi_attention as kivi_attention_module
import pytest
import torch
from kvkernels._utils import cdiv, kernel_device
from kvkernels.kivi_attention import (
    KIVI_L2_PREFETCH_TOKENS,
    KIVIDecodeConfig,
    choose_kivi_splits,
    kivi_cache_attention,
    kivi_decode_attention,
    kivi_decode_attention_ref,
    kivi_token_ranges,
    l2_prefetch_tokens,
)

from refimpl.attention import decode_attention as ref_attention
from refimpl.kivi import KIVICache, NaiveQuantCache

decode_attention_module = sys.modules["kvkernels.decode_attention"]  # the package exports the function by that name

DEV = kernel_device()
ON_GPU = DEV.type == "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOL = {F32: (1e-5, 1e-5), F16: (2e-3, 2e-3), BF16: (1.6e-2, 1.6e-2)}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny tensors: torch's thread pool only adds overhead (and stalls on shared CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(b: int, h_kv: int, t: int, d: int, bits: int, group: int, res: int, dtype: torch.dtype, seed: int,
          mid_step: bool = False) -> KIVICache:
    """A KIVI cache holding t tokens of random keys (with two outlier channels) and values."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, h_kv, t, d, generator=g)
    k[..., 1] += 6.0
    k[..., d // 2] -= 4.0
    v = torch.randn(b, h_kv, t, d, generator=g)
    c = KIVICache(1, bits=bits, group_size=group, residual_length=res)
    if mid_step:  # prefill t-1 tokens, then append one without flushing: what the kernel sees in a fused step
        c.update(0, k[:, :, :-1].to(dtype).to(DEV), v[:, :, :-1].to(dtype).to(DEV))
        c.append(0, k[:, :, -1:].to(dtype).to(DEV), v[:, :, -1:].to(dtype).to(DEV))
    else:
        c.update(0, k.to(dtype).to(DEV), v.to(dtype).to(DEV))
    return c


def query(b: int, h_q: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(b, h_q, d, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype).to(DEV)


def check(c: KIVICache, q: torch.Tensor, **kw) -> None:
    st = c.layer_state(0)
    args = (st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res)
    out, lse = kivi_decode_attention(q, *args, bits=c.bits, group_size=c.group_size, return_lse=True, **kw)
    want, want_lse = kivi_decode_attention_ref(q.cpu(), *(None if a is None else a.cpu() for a in args),
                                               bits=c.bits, group_size=c.group_size, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float().cpu(), want.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu(), want_lse, atol=2e-4, rtol=1e-5)


CASES = [  # b, h_kv, gq, t, d, bits, group, res, splits
    (2, 2, 1, 301, 64, 2, 32, 64, None),  # odd T: 256 quantized keys + 45 fp, 237 quantized values + 64 fp
    (1, 2, 3, 77, 32, 4, 16, 32, 3),  # GQA group of 3, odd split count
    (1, 1, 2, 20, 64, 2, 16, 32, None),  # T < R: nothing quantized, residual only
    (2, 1, 1, 128, 96, 8, 32, 64, 5),  # T multiple of R (no fp keys), D = 96 (3 words of 8-bit codes per 32)
    (1, 1, 1, 40, 32, 2, 16, 16, 16),  # more splits than tiles: empty splits
    (1, 2, 2, 300, 128, 2, 32, 64, None),  # D = 128 (the benchmark's head dim): 8 words of 2-bit codes per token
    (1, 1, 1, 200, 128, 4, 32, 32, 3),  # D = 128, 4-bit: 16 words per token
]


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}hkv{}g{}t{}d{}bits{}G{}R{}s{}".format(*c))
def test_matches_reference(case, dtype):
    b, h_kv, gq, t, d, bits, group, res, splits = case
    c = build(b, h_kv, t, d, bits, group, res, dtype, seed=t)
    check(c, query(b, h_kv * gq, d, dtype, seed=t + 1), num_splits=splits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k_mag,v_mag,q_mag", [(1e3, 1e-3, 1.0), (1e-3, 1e3, 30.0), (30.0, 30.0, 1e-3)])
def test_wide_magnitudes(bits, k_mag, v_mag, q_mag):
    """The kernel multiplies codes read as *denormal* floats by factors up to ~2^85 (module docstring); keys,
    values and queries over six orders of magnitude must neither underflow nor overflow.  On a GPU this also
    checks that the compiled multiply-adds keep denormal inputs (no flush to zero)."""
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(1, 2, 170, 64, generator=g) * k_mag
    k[..., 5] += 4 * k_mag
    v = torch.randn(1, 2, 170, 64, generator=g) * v_mag
    c = KIVICache(1, bits=bits, group_size=32, residual_length=32)
    c.update(0, k.to(DEV), v.to(DEV))
    q = (torch.randn(1, 4, 64, generator=g) * q_mag).to(DEV)
    st = c.layer_state(0)
    args = (st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res)
    out = kivi_decode_attention(q, *args, bits=bits, group_size=32).cpu()
    want = kivi_decode_attention_ref(q.cpu(), *(None if a is None else a.cpu() for a in args), bits=bits,
                                     group_size=32)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def _strided_copy(x: torch.Tensor | None, pad: int, heads_inner: bool, every: int = 1) -> torch.Tensor | None:
    """The same values in a non-contiguous view: rows padded by ``pad`` elements, every ``every``-th element of
    the last axis, and, if ``heads_inner``, stored as [B, T, H, ...] and permuted back (so the token stride
    exceeds the head stride)."""
    if x is None:
        return None
    b, h, t, n = x.shape
    m = (n + pad) * every
    buf = torch.full((b, t, h, m) if heads_inner else (b, h, t, m), 7, dtype=x.dtype, device=x.device)
    view = (buf.permute(0, 2, 1, 3) if heads_inner else buf)[..., : n * every : every]
    view.copy_(x)
    return view


@pytest.mark.parametrize("zeros_like_scales", [True, False])
def test_any_strides(zeros_like_scales):
    """Every tensor argument a non-contiguous view with its own strides: the kernel must use each one's own (a
    key-code tile stepped with the value codes' token stride, say, reads the wrong rows).  Zero points laid out
    like their scales are read in place; laid out differently, the wrapper copies both (they share offsets)."""
    c = build(2, 3, 301, 64, 2, 16, 32, F32, seed=12)
    st = c.layer_state(0)
    args = (st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res)
    layout = [{"pad": 1 + 2 * i, "heads_inner": i % 2 == 1, "every": 1 + (i % 3 == 2)} for i in range(len(args))]
    if zeros_like_scales:
        layout[2], layout[6] = layout[1], layout[5]
    views = tuple(_strided_copy(a, **lay) for a, lay in zip(args, layout))
    assert not any(v.is_contiguous() for v in views)
    assert (views[1].stride() == views[2].stride()) == zeros_like_scales
    q = query(2, 6, 64, F32, seed=13)
    q_view = _strided_copy(q[:, :, None], pad=3, heads_inner=False)[:, :, 0]
    out = kivi_decode_attention(q_view, *views, bits=2, group_size=16, num_splits=3).cpu()
    want = kivi_decode_attention_ref(q.cpu(), *(None if a is None else a.cpu() for a in args), bits=2,
                                     group_size=16)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_t", [8, 16, 32])
def test_mid_step_state_and_tile_sizes(block_t):
    c = build(1, 2, 192, 32, 2, 32, 64, F16, seed=4, mid_step=True)
    assert c.split(0) == (128, 64, 127, 65)  # after append, before flush: R fp keys, R + 1 fp values
    check(c, query(1, 2, 32, F16, seed=5), config=KIVIDecodeConfig(block_t=block_t, num_warps=4))


@pytest.mark.parametrize("bits,splits", [(2, None), (2, 4), (4, None)])
def test_head_dim_128_mid_step(bits, splits):
    """The shape the benchmark times (D = 128, G = 32) in the state a fused decode step sees, with splits that hold
    several key groups each and a tail of residual tokens."""
    c = build(2, 2, 333, 128, bits, 32, 64, F16, seed=21, mid_step=True)
    check(c, query(2, 4, 128, F16, seed=22), num_splits=splits)


def test_equals_attention_over_what_the_cache_returns():
    """The kernel attends to exactly the keys/values KIVICache.read() hands the reference model path."""
    c = build(2, 2, 150, 64, 2, 32, 32, F32, seed=8)
    q = query(2, 4, 64, F32, seed=9)
    kv = c.read(0)
    want = ref_attention(q.cpu(), kv.k.cpu(), kv.v.cpu())
    torch.testing.assert_close(kivi_cache_attention(q, c, 0).cpu(), want, atol=1e-5, rtol=1e-5)


def test_scale_argument():
    c = build(1, 1, 70, 32, 4, 16, 32, F32, seed=10)
    q = query(1, 1, 32, F32, seed=11)
    st = c.layer_state(0)
    got = kivi_cache_attention(q, c, 0, scale=0.05)
    kv = c.read(0)
    torch.testing.assert_close(got.cpu(), ref_attention(q.cpu(), kv.k.cpu(), kv.v.cpu(), scale=0.05),
                               atol=1e-5, rtol=1e-5)
    assert st.k_codes is not None


@pytest.mark.parametrize("args,want", [
    ((1, 32, 32832, 8, 132), 66),  # batch 1: one wave of 16 programs per SM = 2112 programs → 66 splits
    ((4, 32, 4160, 8, 132), 16),  # one wave: 2112 // 128 = 16 (rounding up, 17, would add a sliver of a wave)
    ((4, 32, 32832, 8, 132), 33),  # 2 waves of ~1024-token ranges: 2·2112 // 128 = 33
    ((8, 32, 65600, 8, 132), 66),  # 8 waves of ~1000-token ranges
    ((32, 32, 32832, 8, 132), 33),  # 16 waves: 16·2112 // 1024 = 33
    ((32, 32, 65600, 8, 132), 63),  # round(31.06) = 31 waves: 31·2112 // 1024 = 63
    ((128, 32, 64, 8, 132), 1),  # more heads than a wave holds: one range each
    ((1, 1, 40, 8, 132), 3),  # only 5 tiles: at least 2 tiles per split
    ((1, 1, 1 << 24, 8, 132), 128),  # capped at MAX_SPLITS
])
def test_choose_kivi_splits_known_answers(args, want):
    assert choose_kivi_splits(*args) == want


@pytest.mark.parametrize("sms", [132, 78, 7])
def test_choose_kivi_splits_fills_whole_waves(sms):
    """The launch ends on a full wave (16 programs per SM): one more split per head would overflow it."""
    wave = 16 * sms
    for batch in (1, 2, 3, 4, 5, 8, 13, 16, 32):
        for heads_per in (8, 32):
            heads = batch * heads_per
            if heads > wave:
                continue
            for tokens in (4160, 8256, 16448, 32832, 65600, 131136):
                splits = choose_kivi_splits(batch, heads_per, tokens, 8, sms)
                if splits == 128:  # MAX_SPLITS
                    continue
                waves = cdiv(splits * heads, wave)
                assert (splits + 1) * heads > waves * wave, (batch, heads_per, tokens, splits)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="maxnreg must be None or an int in"):
        KIVIDecodeConfig(maxnreg=8)
    with pytest.raises(ValueError, match="block_t must be one of"):
        KIVIDecodeConfig(block_t=12)
    c = build(1, 1, 70, 32, 2, 16, 32, F32, seed=12)
    st = c.layer_state(0)
    q = query(1, 1, 32, F32, seed=13)
    args = [st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res]
    with pytest.raises(ValueError, match="block_t .* must divide group_size"):
        kivi_decode_attention(q, *args, bits=2, group_size=16, config=KIVIDecodeConfig(block_t=32))
    with pytest.raises(ValueError, match="k_scale must have shape"):
        kivi_decode_attention(q, *args[:1], args[1][:, :, :1], *args[2:], bits=2, group_size=16)
    with pytest.raises(TypeError, match="k_codes must be torch.int32"):
        kivi_decode_attention(q, args[0].long(), *args[1:], bits=2, group_size=16)
    with pytest.raises(ValueError, match="they must agree"):
        kivi_decode_attention(q, *args[:7], args[7][:, :, :-1], bits=2, group_size=16)
    with pytest.raises(ValueError, match="bits must be one of"):
        kivi_decode_attention(q, *args, bits=3, group_size=16)
    with pytest.raises(ValueError, match="num_splits"):
        kivi_decode_attention(q, *args, bits=2, group_size=16, num_splits=0)
    with pytest.raises(ValueError, match=r"kv_heads \(1\) must divide|q must be"):
        kivi_decode_attention(q[:, :, None], *args, bits=2, group_size=16)
    with pytest.raises(TypeError, match="KIVICache"):
        kivi_cache_attention(q, NaiveQuantCache(1, 2, 16, 16), 0)
    empty = [None, None, None, st.k_res[:, :, :0], None, None, None, st.v_res[:, :, :0]]
    with pytest.raises(ValueError, match="empty"):
        kivi_decode_attention(q, *empty, bits=2, group_size=16)


@pytest.mark.parametrize("args,want", [
    # batch 1, 32k decode step (hint 66 = one wave): 64 bulk ranges of 512 tokens, the 160-token tail in 96 + 64
    ((32832, 32672, 32, 66), (64, 512, 32672, 96, 66)),
    ((32832, 32672, 32, 33), (32, 1024, 32672, 160, 33)),  # batch 32: one tail range (160 tail tokens ~ 480 bulk)
    ((4160, 4000, 32, 66), (42, 96, 4000, 32, 47)),  # 4k: tail tokens 3x the cost -> 96-token bulk ranges
    ((20, 0, 16, 3), (0, 32, 0, 16, 2)),  # nothing quantized: all tail
    ((128, 128, 32, 5), (4, 32, 128, 32, 4)),  # no tail
    ((301, 224, 32, 5, False), (5, 64, 301, 32, 5)),  # explicit num_splits: uniform over all tokens
])
def test_kivi_token_ranges_known_answers(args, want):
    assert kivi_token_ranges(*args) == want


@pytest.mark.parametrize("tokens,bulk,group,splits", [(32832, 32672, 32, 66), (4160, 4000, 32, 66), (301, 224, 32, 5),
                                                      (20, 0, 16, 3), (128, 128, 32, 5), (999, 960, 32, 128),
                                                      (5000, 4096, 64, 7), (40, 32, 16, 1)])
def test_kivi_token_ranges_cover_every_token_once(tokens, bulk, group, splits):
    first, tps, mid, ttps, total = kivi_token_ranges(tokens, bulk, group, splits)
    assert mid in (bulk, tokens) and total <= splits and tps % group == 0 and ttps % group == 0
    ranges = [(i * tps, min((i + 1) * tps, mid)) for i in range(first)]
    ranges += [(mid + j * ttps, min(mid + (j + 1) * ttps, tokens)) for j in range(total - first)]
    covered = [t for a, e in ranges for t in range(a, e)]
    assert covered == list(range(tokens)) and all(a % group == 0 and a < e for a, e in ranges)


def test_separate_tail_ranges_match_reference(monkeypatch):
    """The default launch cuts bulk and tail apart (kivi_token_ranges): many ranges of each, on a mid-step cache."""
    c = build(2, 2, 333, 64, 2, 16, 32, F32, seed=16, mid_step=True)
    monkeypatch.setattr(kivi_attention_module, "choose_kivi_splits", lambda *a: 9)
    first, _, _, _, total = kivi_token_ranges(333, 288, 16, 9)
    assert first >= 2 and total - first >= 2
    check(c, query(2, 4, 64, F32, seed=17))


def test_l2_prefetch_only_beyond_one_wave():
    """16 one-warp programs per SM make a wave; the L2 prefetch measured slower within one (module comment)."""
    assert KIVI_L2_PREFETCH_TOKENS > 0
    assert l2_prefetch_tokens(16 * 132, 132) == 0
    assert l2_prefetch_tokens(16 * 132 + 1, 132) == KIVI_L2_PREFETCH_TOKENS


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [16, 48])
def test_l2_prefetch_changes_no_result(monkeypatch, ahead):
    """The prefetch is a hint: forced on for a small launch (where the rule would leave it off), the output is
    bit-for-bit the kernel's without it, on a cache whose splits hold several key groups and a tail."""
    c = build(3, 2, 1000, 128, 2, 32, 128, F16, seed=14, mid_step=True)
    q = query(3, 4, 128, F16, seed=15)
    monkeypatch.setattr(kivi_attention_module, "l2_prefetch_tokens", lambda programs, sms: 0)
    st = c.layer_state(0)
    args = (st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res)
    want = kivi_decode_attention(q, *args, bits=2, group_size=32, num_splits=4)
    monkeypatch.setattr(kivi_attention_module, "l2_prefetch_tokens", lambda programs, sms: ahead)
    got = kivi_decode_attention(q, *args, bits=2, group_size=32, num_splits=4)
    assert torch.equal(got, want)
    check(c, q, num_splits=4)


@pytest.mark.parametrize("splits", [None, 1, 5])
def test_in_kernel_merge_equals_combine_kernel(monkeypatch, splits):
    """The last program of each (batch, head) merges the partials itself (KIVI_MERGE_IN_KERNEL): the same output
    and LSE as the separate combine kernel, and both match the reference."""
    c = build(2, 2, 333, 64, 2, 16, 32, F32, seed=18, mid_step=True)
    q = query(2, 4, 64, F32, seed=19)
    st = c.layer_state(0)
    args = (st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res)
    outs = {}
    for merge in (False, True):
        monkeypatch.setattr(kivi_attention_module, "KIVI_MERGE_IN_KERNEL", merge)
        outs[merge] = kivi_decode_attention(q, *args, bits=2, group_size=16, num_splits=splits, return_lse=True)
        check(c, q, num_splits=splits)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-6, rtol=1e-6)


def test_in_kernel_merge_counts_return_to_zero(monkeypatch):
    """Each launch leaves its per-head counts at zero, so the next call (same or more heads) merges again; a count
    left behind would skip the merge and leave the output unwritten."""
    monkeypatch.setattr(kivi_attention_module, "KIVI_MERGE_IN_KERNEL", True)
    monkeypatch.setattr(decode_attention_module, "_COUNTERS", {})
    for b, h_kv, splits in ((1, 2, 3), (1, 2, 3), (3, 1, 4)):
        c = build(b, h_kv, 200, 32, 4, 16, 32, F32, seed=20 + b)
        check(c, query(b, 2 * h_kv, 32, F32, seed=21), num_splits=splits)
        (buf,) = decode_attention_module._COUNTERS.values()
        assert int(torch.count_nonzero(buf)) == 0


@pytest.mark.parametrize("min_tokens", [0, 10**9])
def test_merge_while_a_graph_is_captured(monkeypatch, min_tokens):
    """While a CUDA graph is captured (``capturing`` patched to say so) the partials are merged in the kernel (with a
    fresh zeroed count buffer) when the ranges hold GRAPH_MERGE_MIN_TOKENS or more, else by the combine kernel;
    eager calls always merge in the kernel."""
    monkeypatch.setattr(kivi_attention_module, "KIVI_MERGE_IN_KERNEL", True)
    monkeypatch.setattr(kivi_attention_module, "GRAPH_MERGE_MIN_TOKENS", min_tokens)
    c = build(1, 2, 200, 32, 2, 16, 32, F32, seed=22)
    q = query(1, 2, 32, F32, seed=23)
    calls = []
    real = kivi_attention_module.launch_combine
    monkeypatch.setattr(kivi_attention_module, "launch_combine", lambda *a, **kw: (calls.append(1), real(*a, **kw)))
    check(c, q, num_splits=3)
    assert calls == []
    monkeypatch.setattr(kivi_attention_module, "capturing", lambda device: True)
    check(c, q, num_splits=3)
    assert calls == ([] if min_tokens == 0 else [1])


@pytest.mark.gpu
@pytest.mark.parametrize("min_tokens", [0, 10**9])
def test_gpu_call_is_cuda_graph_capturable(monkeypatch, min_tokens):
    """Captured once (mid-step cache, the default split count), replayed on new queries: the reference's answer,
    and eager calls after the capture still right; with the merge in the graph (its own zeroed count buffer, set
    back to zero by every replay) or the combine kernel."""
    monkeypatch.setattr(kivi_attention_module, "GRAPH_MERGE_MIN_TOKENS", min_tokens)
    c = build(2, 4, 3000, 128, 2, 32, 128, F16, seed=24, mid_step=True)
    st = c.layer_state(0)
    args = (st.k_codes, st.k_scale, st.k_zero, st.k_res, st.v_codes, st.v_scale, st.v_zero, st.v_res)
    q = query(2, 4, 128, F16, seed=25)
    kivi_decode_attention(q, *args, bits=2, group_size=32)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kivi_decode_attention(q, *args, bits=2, group_size=32)
    for seed in (26, 27, 28):
        q.copy_(query(2, 4, 128, F16, seed=seed))
        graph.replay()
        torch.cuda.synchronize()
        want = kivi_decode_attention_ref(q.cpu(), *(a.cpu() for a in args), bits=2, group_size=32)
        torch.testing.assert_close(out.float().cpu(), want.float(), atol=2e-3, rtol=2e-3)
        check(c, q)


KIVI_AOT_SCRIPT = r"""
from kvkernels._utils import compile_for_gpu
from kvkernels.kivi_attention import K_KEY, K_VAL, _kivi_split_kernel

PTRS = {"Q": "*fp16", "KC": "*i32", "KS": "*fp16", "KZ": "*fp16", "KR": "*fp16", "VC": "*i32", "VS": "*fp16",
        "VZ": "*fp16", "VR": "*fp16", "MidO": "*fp32", "MidLse": "*fp32", "Out": "*fp16", "Lse": "*fp32",
        "Done": "*i32", "qk_scale_log2": "fp32"}
types = {a: PTRS.get(a, "i32") for a in (p.name for p in _kivi_split_kernel.params if not p.is_constexpr)}
for bits, ahead, merge in ((2, 0, True), (2, 16, True), (4, 16, False)):
    f = 32 // bits
    const = dict(GQ=1, WORDS=128 // f, BLOCK_W=128 // f, CPW=f, BITS=bits, G=32, WPG=32 // f, BLOCK_T=8, K_K=K_KEY,
                 K_V=K_VAL, L2_AHEAD=ahead, LAUNCH_DEPS=not merge, MERGE=merge, FENCE=merge, BLOCK_S=16)
    k = compile_for_gpu(_kivi_split_kernel, types, const, num_warps=1, num_stages=1)
    ptx = k.asm["ptx"]
    assert ("prefetch.global.L2" in ptx) == (ahead > 0), (bits, ahead)
    assert ("griddepcontrol.launch_dependents" in ptx) == (not merge), (bits, merge)
    assert ("fence.acq_rel.gpu" in ptx and "atom.global.gpu.acq_rel" in ptx) == merge, (bits, merge)
print("compiled ok")
"""


@pytest.mark.slow
def test_kivi_kernel_compiles_for_hopper_without_a_gpu(compile_without_gpu):
    """The L2 prefetch and the merge's fence are inline PTX that the interpreter never runs: compile the kernel for
    sm_90 (Triton's bundled ptxas, no GPU needed) with and without them."""
    compile_without_gpu(KIVI_AOT_SCRIPT)


@pytest.mark.gpu
def test_64bit_offsets_on_gpu():
    """Row 2 starts 2^31 elements into each residual tensor (3 x 2^23 tokens x 128 fp16: 6 GiB each)."""
    t, d = (1 << 23) + 33, 128
    k_res = torch.randn(3, 1, t, d, device=DEV, dtype=F16)
    v_res = torch.randn(3, 1, t, d, device=DEV, dtype=F16)
    q = torch.randn(3, 1, d, device=DEV, dtype=F16)
    out = kivi_decode_attention(q, None, None, None, k_res, None, None, None, v_res, bits=2, group_size=32)
    want = ref_attention(q[2:].float(), k_res[2:].float(), v_res[2:].float())
    torch.testing.assert_close(out[2:].float(), want, atol=2e-3, rtol=2e-3)
