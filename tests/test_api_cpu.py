"""The public API on CPU tensors: entry points, packing, return values, and every refusal.

Validation reads only shapes, dtypes and devices, so all of it is exercised here without a GPU
(``meta`` tensors stand in for a second device)."""

import pytest
import torch

import flash_attn2
from flash_attn2 import _ops, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func
from flash_attn2.reference import attention_ref


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def qkv_tensors(batch=2, seqlen_q=33, seqlen_k=47, nheads=4, nheads_k=2, head_dim=32, dtype=torch.float32):
    return (
        randn(batch, seqlen_q, nheads, head_dim, dtype=dtype),
        randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype),
        randn(batch, seqlen_k, nheads_k, head_dim, dtype=dtype),
    )


def test_import_exposes_api_without_the_extension():
    assert flash_attn2.__version__ == "0.1.0"
    assert callable(flash_attn2.flash_attn_func) and callable(flash_attn2.reference.attention_ref)
    if not _ops.extension_available():
        assert flash_attn2.built_kernels() == flash_attn2.built_kernels("bwd") == frozenset()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nheads_k", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_flash_attn_func_matches_reference(nheads_k, causal):
    q, k, v = qkv_tensors(nheads_k=nheads_k)
    out = flash_attn_func(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, attention_ref(q, k, v, causal=causal)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_qkvpacked_equals_unpacked(causal):
    qkv = randn(2, 40, 3, 4, 16)
    out = flash_attn_qkvpacked_func(qkv, softmax_scale=0.3, causal=causal)
    expected = flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], softmax_scale=0.3, causal=causal)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kvpacked_equals_unpacked_with_gqa(causal):
    q, kv = randn(2, 30, 4, 16), randn(2, 50, 2, 1, 16)
    out = flash_attn_kvpacked_func(q, kv, causal=causal)
    assert torch.equal(out, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=causal))


def test_qkvpacked_gradient_reaches_packed_tensor():
    qkv = randn(1, 6, 3, 2, 8, dtype=torch.float64).requires_grad_()
    flash_attn_qkvpacked_func(qkv).sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0


@pytest.mark.parametrize("entry", ["func", "qkvpacked", "kvpacked"])
def test_return_attn_probs_gives_out_lse_none(entry):
    q = randn(2, 20, 4, 16)
    if entry == "func":
        result = flash_attn_func(q, q, q, return_attn_probs=True)
    elif entry == "qkvpacked":
        result = flash_attn_qkvpacked_func(torch.stack([q, q, q], dim=2), return_attn_probs=True)
    else:
        result = flash_attn_kvpacked_func(q, torch.stack([q, q], dim=2), return_attn_probs=True)
    out, lse, s_dmask = result
    assert s_dmask is None
    assert lse.shape == (2, 4, 20) and lse.dtype == torch.float32
    expected_out, expected_lse = attention_ref(q, q, q)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [40, 72, 100, 5, 256])
def test_default_scale_uses_real_head_dim(head_dim):
    """On CUDA a head dim runs on a larger kernel (after zero-padding to a multiple of 8 if needed);
    the default scale must stay 1/sqrt(real head dim) on every path."""
    q, k, v = qkv_tensors(seqlen_q=17, seqlen_k=19, head_dim=head_dim)
    out = flash_attn_func(q, k, v)
    torch.testing.assert_close(out, attention_ref(q, k, v, softmax_scale=head_dim**-0.5)[0], rtol=1e-5, atol=1e-5)


def test_explicit_softmax_scale_is_used():
    q, k, v = qkv_tensors()
    torch.testing.assert_close(flash_attn_func(q, k, v, softmax_scale=0.05), attention_ref(q, k, v, 0.05)[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_cpu_accepts_all_float_dtypes_and_keeps_them(dtype):
    q, k, v = qkv_tensors(dtype=dtype)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    torch.testing.assert_close(out.float(), attention_ref(q, k, v, causal=True)[0].float(), rtol=tol, atol=tol)


def test_non_contiguous_inputs_give_the_same_result():
    q, k, v = qkv_tensors()
    bhsd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # (b, h, s, d) memory
    strided_last = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]  # stride(-1) != 1
    assert not bhsd[0].is_contiguous() and strided_last[0].stride(-1) != 1
    expected = flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(flash_attn_func(*bhsd, causal=True), expected)
    torch.testing.assert_close(flash_attn_func(*strided_last, causal=True), expected)


def test_deterministic_flag_is_accepted():
    q, k, v = qkv_tensors()
    assert torch.equal(flash_attn_func(q, k, v, deterministic=True), flash_attn_func(q, k, v))


# flash-attn's modifiers are accepted by every dense entry point (semantics: tests/test_modifiers_cpu.py).


@pytest.mark.parametrize(
    "kwargs",
    [{"window_size": (3, 0)}, {"softcap": 30.0}, {"alibi_slopes": torch.rand(4)}],
    ids=["window", "softcap", "alibi"],
)
@pytest.mark.parametrize("entry", ["func", "qkvpacked", "kvpacked"])
def test_modifiers_are_accepted_by_every_entry(entry, kwargs):
    q = randn(1, 8, 4, 16)
    if entry == "func":
        out = flash_attn_func(q, q, q, **kwargs)
    elif entry == "qkvpacked":
        out = flash_attn_qkvpacked_func(torch.stack([q, q, q], dim=2), **kwargs)
    else:
        out = flash_attn_kvpacked_func(q, torch.stack([q, q], dim=2), **kwargs)
    assert out.shape == q.shape and torch.isfinite(out).all()
    assert not torch.equal(out, flash_attn_func(q, q, q)), "the modifier changed nothing"


# Validation: one test per refusal, matching the message.


def test_rejects_non_tensor_argument():
    q = randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        flash_attn_func(q, [[1.0]], q)


def test_rejects_3d_q():
    k = randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"q must be 4-d \(batch, seqlen, nheads, headdim\), got shape \(4, 2, 8\)"):
        flash_attn_func(randn(4, 2, 8), k, k)


def test_rejects_5d_v():
    q = randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"v must be 4-d .* got shape \(1, 4, 2, 8, 1\) \(5-d\)"):
        flash_attn_func(q, q, randn(1, 4, 2, 8, 1))


def test_rejects_tensors_on_different_devices():
    q = randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="must be on one device, got q on cpu, k on meta, v on cpu"):
        flash_attn_func(q, randn(1, 4, 2, 8, device="meta"), q)


def test_rejects_unsupported_device_type():
    q = randn(1, 4, 2, 8, device="meta")
    with pytest.raises(ValueError, match="tensors on meta are not supported"):
        flash_attn_func(q, q, q)


def test_rejects_mixed_dtypes():
    q = randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="must have one dtype, got q torch.float32, k torch.float16, v torch.float32"):
        flash_attn_func(q, q.half(), q)


def test_rejects_integer_dtype_on_cpu():
    q = torch.ones(1, 4, 2, 8, dtype=torch.int32)
    match = "on CPU the dtype must be one of float16, bfloat16, float32, float64, got torch.int32"
    with pytest.raises(TypeError, match=match):
        flash_attn_func(q, q, q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (validation only, no extension)")
def test_rejects_float32_on_cuda():
    q = randn(1, 4, 2, 8, device="cuda")
    match = r"on CUDA the dtype must be one of float16, bfloat16, got torch.float32 \(cast with"
    with pytest.raises(TypeError, match=match):
        flash_attn_func(q, q, q)


@pytest.mark.skipif(
    not torch.cuda.is_available() or _ops.extension_available(), reason="needs a CUDA device and no built extension"
)
def test_cuda_without_extension_says_how_to_build():
    q = randn(1, 4, 2, 8, dtype=torch.float16, device="cuda")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        flash_attn_func(q, q, q)


@pytest.mark.skipif(_ops.extension_available(), reason="the extension is built")
def test_ops_fwd_without_extension_says_how_to_build():
    q = randn(1, 4, 2, 8, dtype=torch.float16)
    match = r"not available .*python setup.py build_ext --inplace.*FLASH_ATTN2_HEAD_DIMS"
    with pytest.raises(RuntimeError, match=match):
        _ops.fwd(q, q, q, 1.0, False)


def test_rejects_batch_mismatch():
    q, k = randn(2, 4, 2, 8), randn(3, 4, 2, 8)
    with pytest.raises(ValueError, match="batch sizes differ: q 2, k 3, v 3"):
        flash_attn_func(q, k, k)


def test_rejects_k_v_seqlen_mismatch():
    q = randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k and v must have the same seqlen, got k 5 and v 6"):
        flash_attn_func(q, randn(1, 5, 2, 8), randn(1, 6, 2, 8))


def test_rejects_k_v_nheads_mismatch():
    q = randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="k and v must have the same number of heads, got k 2 and v 4"):
        flash_attn_func(q, randn(1, 5, 2, 8), randn(1, 5, 4, 8))


def test_rejects_head_dim_mismatch():
    q = randn(1, 4, 2, 64)
    with pytest.raises(ValueError, match="must have one head dim, got q 64, k 64, v 32"):
        flash_attn_func(q, q, randn(1, 4, 2, 32))


def test_rejects_head_dim_over_256():
    q = randn(1, 4, 2, 264)
    with pytest.raises(ValueError, match=r"head dim must be in 1\.\.256, got 264"):
        flash_attn_func(q, q, q)


def test_rejects_head_dim_zero():
    q = randn(1, 4, 2, 0)
    with pytest.raises(ValueError, match=r"head dim must be in 1\.\.256, got 0"):
        flash_attn_func(q, q, q)


def test_rejects_nheads_not_multiple_of_nheads_k():
    q, k = randn(1, 4, 8, 16), randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match=r"query heads \(8\) must be a multiple of the number of kv heads \(3\)"):
        flash_attn_func(q, k, k)


def test_rejects_zero_kv_heads():
    q, k = randn(1, 4, 8, 16), randn(1, 4, 0, 16)
    with pytest.raises(ValueError, match=r"query heads \(8\) must be a multiple of the number of kv heads \(0\)"):
        flash_attn_func(q, k, k)


def test_qkvpacked_rejects_wrong_packing():
    match = r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\), got \(1, 4, 2, 2, 8\)"
    with pytest.raises(ValueError, match=match):
        flash_attn_qkvpacked_func(randn(1, 4, 2, 2, 8))


def test_kvpacked_rejects_wrong_packing():
    match = r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\), got \(1, 4, 2, 8\)"
    with pytest.raises(ValueError, match=match):
        flash_attn_kvpacked_func(randn(1, 4, 2, 8), randn(1, 4, 2, 8))


# The build's kernel list, as the C++ extension reports it.


def test_parse_built_kernels():
    text = ("fwd bf16 128 causal plain\nfwd bf16 128 none plain\n\nfwd fp16 64 local mod\nbwd bf16 128 none plain\n"
            "bwd fp16 256 causal mod\n")
    assert _ops.parse_built_kernels(text) == {
        _ops.KernelKey("bf16", 128, "causal", "plain"),
        _ops.KernelKey("bf16", 128, "none", "plain"),
        _ops.KernelKey("fp16", 64, "local", "mod"),
    }
    assert _ops.parse_built_kernels(text, "fwd") == _ops.parse_built_kernels(text)
    assert _ops.parse_built_kernels(text, "bwd") == {
        _ops.KernelKey("bf16", 128, "none", "plain"),
        _ops.KernelKey("fp16", 256, "causal", "mod"),
    }
    assert _ops.parse_built_kernels("fwd bf16 64 none plain\nxyz anything at all", "bwd") == frozenset()


def test_parse_built_kernels_knows_the_modifier_families():
    text = "fwd bf16 128 none softcap\nfwd bf16 128 causal alibi\nbwd fp16 64 local mod\n"
    assert _ops.parse_built_kernels(text) == {
        _ops.KernelKey("bf16", 128, "none", "softcap"),
        _ops.KernelKey("bf16", 128, "causal", "alibi"),
    }


@pytest.mark.parametrize(
    "softcap,alibi,dropout_p,family",
    [(0.0, None, 0.0, "plain"), (30.0, None, 0.0, "softcap"), (0.0, "slopes", 0.0, "alibi"),
     (30.0, "slopes", 0.0, "mod"), (0.0, None, 0.1, "mod"), (5.0, None, 0.1, "mod"), (0.0, "slopes", 0.1, "mod")],
)
def test_kernel_modifiers_names_the_family_the_dispatcher_picks(softcap, alibi, dropout_p, family):
    """As FwdParams::modifiers() in params.h: the one-modifier family of a lone softcap or ALiBi, "mod" for
    dropout or for several at once; "mod" kernels also serve the one-modifier calls."""
    assert _ops.kernel_modifiers(softcap, alibi, dropout_p) == family
    assert _ops.serving_families(family) == ((family, "mod") if family in ("softcap", "alibi") else (family,))


def test_largest_head_dim_counts_the_mod_kernels_for_one_modifier_calls(monkeypatch):
    kernels = frozenset({_ops.KernelKey("bf16", 128, "none", "mod"), _ops.KernelKey("bf16", 64, "none", "softcap"),
                         _ops.KernelKey("bf16", 256, "none", "plain")})
    monkeypatch.setattr(_ops, "built_kernels", lambda direction="fwd": kernels)
    assert _ops.largest_head_dim(torch.bfloat16, "none", "softcap") == 128  # its own 64, or mod's 128
    assert _ops.largest_head_dim(torch.bfloat16, "none", "alibi") == 128    # mod only
    assert _ops.largest_head_dim(torch.bfloat16, "none", "mod") == 128
    assert _ops.largest_head_dim(torch.bfloat16, "none", "plain") == 256   # mod never serves a plain call
    assert _ops.largest_head_dim(torch.bfloat16, "causal", "softcap") == 0


@pytest.mark.parametrize(
    "line",
    ["fwd bf16 128 none", "fwd fp32 128 none plain", "fwd bf16 x none plain", "fwd bf16 64 window plain",
     "fwd bf16 64 none fancy", "bwd bf16 64", "bwd f16 64 none plain"],
)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_parse_built_kernels_rejects_malformed_line(line, direction):
    """A malformed line of either direction is an error whichever direction is asked for."""
    with pytest.raises(RuntimeError, match="cannot parse built_kernels"):
        _ops.parse_built_kernels(line, direction)


def test_built_kernels_rejects_unknown_direction():
    with pytest.raises(ValueError, match="direction must be one of fwd, bwd, kvcache, got 'backward'"):
        _ops.built_kernels("backward")
    with pytest.raises(ValueError, match="direction must be one of fwd, bwd, kvcache"):
        _ops.parse_built_kernels("", "both")


@pytest.mark.parametrize("dynamic", [False, True])
def test_kernel_ready_normalisation_traces_without_graph_break(dynamic):
    """The CUDA path's layout normalisation must stay traceable by torch.compile(fullgraph=True): an
    int-returning call such as Tensor.storage_offset() breaks the graph (seen on torch 2.11)."""
    def normalise(t):
        return _ops.kernel_ready(t) + 1

    compiled = torch.compile(normalise, fullgraph=True, dynamic=dynamic)
    for t in (torch.randn(2, 9, 4, 16), torch.randn(2, 9, 16, 4).transpose(-1, -2)):
        torch.testing.assert_close(compiled(t), t + 1)
