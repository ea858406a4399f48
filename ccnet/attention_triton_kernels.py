"""The Triton kernels of :mod:`ccnet.attention_triton`: flash-style attention along one axis of (B, C, H, W)
tensors, addressed by strides (sequences are (batch, other spatial index), positions the axis).

- ``lse_kernel``: per query, the log-sum-exp of its energies (online max/sum over key blocks).
- ``out_kernel``: ``sum_j exp(e_j - lse) v_j`` with an external ``lse``, added into a float32 output.
- ``dq_kernel`` (per query block), ``dk_kernel`` and ``dv_kernel`` (per key block): FlashAttention-2's
  backward with external ``lse`` and ``D = sum_c dy * y``, added into float32 gradients.

Energies are float32 whatever the inputs; value channels are tiled (``BLOCK_C``), query/key channels held
in one tile (``BLOCK_CK``).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST (Triton's CPU interpreter only, whose bfloat16 dot is wrong)
    multiplies in float32."""
    if UPCAST:
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=PRECISION)
    return product


@triton.jit
def _tile(ptr, rows, cols, s_row, s_col, n_rows, n_cols):
    """The (len(rows), len(cols)) tile at ``ptr``, zeros outside n_rows x n_cols."""
    return tl.load(
        ptr + rows[:, None] * s_row + cols[None, :] * s_col,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _add_tile(ptr, rows, cols, s_row, s_col, n_rows, n_cols, value):
    """Adds ``value`` into the float32 tile at ``ptr`` (each pass adds its share)."""
    where = ptr + rows[:, None] * s_row + cols[None, :] * s_col
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(where, tl.load(where, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _energies(
    q,
    k_ptr,
    offs_m,
    offs_n,
    offs_ck,
    s_kl,
    s_kc,
    length,
    key_channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) float32 energies of the query tile against one key block, -inf where masked."""
    k_t = _tile(k_ptr, offs_ck, offs_n, s_kc, s_kl, key_channels, length)  # (BLOCK_CK, BLOCK_N)
    s = _dot(q, k_t, PRECISION, UPCAST)
    valid = offs_n[None, :] < length
    if SKIP_CENTRE:
        valid = valid & (offs_m[:, None] != offs_n[None, :])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _probabilities(s, lse):
    """exp(s - lse) for a row block; rows whose lse is -inf (nothing to attend to) give 0."""
    finite = lse > float("-inf")
    return tl.where(finite[:, None], tl.exp(s - tl.where(finite, lse, 0.0)[:, None]), 0.0)


@triton.jit
def _queries(q_ptr, lse_ptr, offs_m, offs_ck, s_ql, s_qc, s_ll, length, key_channels):
    """A query block and its softmax normaliser."""
    q = _tile(q_ptr, offs_m, offs_ck, s_ql, s_qc, length, key_channels)
    lse = tl.load(lse_ptr + offs_m * s_ll, mask=offs_m < length, other=float("-inf"))
    return q, lse


@triton.jit
def lse_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    s_qb,
    s_qo,
    s_ql,
    s_qc,
    s_kb,
    s_ko,
    s_kl,
    s_kc,
    s_lb,
    s_lo,
    s_ll,
    others,
    length,
    key_channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_CK: tl.constexpr,
):
    seq = tl.program_id(0)
    b, o = seq // others, seq % others
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ck = tl.arange(0, BLOCK_CK)
    q = _tile(q_ptr + b * s_qb + o * s_qo, offs_m, offs_ck, s_ql, s_qc, length, key_channels)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _energies(
            q,
            k_ptr + b * s_kb + o * s_ko,
            offs_m,
            offs_n,
            offs_ck,
            s_kl,
            s_kc,
            length,
            key_channels,
            SKIP_CENTRE,
            PRECISION,
            UPCAST,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + b * s_lb + o * s_lo + offs_m * s_ll, lse, mask=offs_m < length)


@triton.jit
def out_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    out_ptr,
    s_qb,
    s_qo,
    s_ql,
    s_qc,
    s_kb,
    s_ko,
    s_kl,
    s_kc,
    s_vb,
    s_vo,
    s_vl,
    s_vc,
    s_lb,
    s_lo,
    s_ll,
    s_ob,
    s_oo,
    s_ol,
    s_oc,
    others,
    length,
    key_channels,
    channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CK: tl.constexpr,
):
    seq = tl.program_id(0)
    b, o = seq // others, seq % others
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_ck = tl.arange(0, BLOCK_CK)
    q, lse = _queries(
        q_ptr + b * s_qb + o * s_qo,
        lse_ptr + b * s_lb + o * s_lo,
        offs_m,
        offs_ck,
        s_ql,
        s_qc,
        s_ll,
        length,
        key_channels,
    )
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        s = _energies(
            q,
            k_ptr + b * s_kb + o * s_ko,
            offs_m,
            offs_n,
            offs_ck,
            s_kl,
            s_kc,
            length,
            key_channels,
            SKIP_CENTRE,
            PRECISION,
            UPCAST,
        )
        v = _tile(v_ptr + b * s_vb + o * s_vo, offs_n, offs_c, s_vl, s_vc, length, channels)
        acc += _dot(_probabilities(s, lse).to(v.dtype), v, PRECISION, UPCAST)
    _add_tile(out_ptr + b * s_ob + o * s_oo, offs_m, offs_c, s_ol, s_oc, length, channels, acc)


@triton.jit
def _score_gradients(
    q,
    lse,
    delta,
    k_ptr,
    v_ptr,
    g_ptr,
    offs_m,
    offs_n,
    offs_ck,
    s_kl,
    s_kc,
    s_vl,
    s_vc,
    s_gl,
    s_gc,
    length,
    key_channels,
    channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Energy gradients dS = P * (dy . v - D) of a (query block, key block) pair, the value channels in
    tiles."""
    s = _energies(
        q, k_ptr, offs_m, offs_n, offs_ck, s_kl, s_kc, length, key_channels, SKIP_CENTRE, PRECISION, UPCAST
    )
    dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for c0 in range(0, channels, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        g = _tile(g_ptr, offs_m, offs_c, s_gl, s_gc, length, channels)
        v_t = _tile(v_ptr, offs_c, offs_n, s_vc, s_vl, channels, length)
        dp += _dot(g, v_t, PRECISION, UPCAST)
    return _probabilities(s, lse) * (dp - delta[:, None])


@triton.jit
def dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    lse_ptr,
    d_ptr,
    dq_ptr,
    s_qb,
    s_qo,
    s_ql,
    s_qc,
    s_kb,
    s_ko,
    s_kl,
    s_kc,
    s_vb,
    s_vo,
    s_vl,
    s_vc,
    s_gb,
    s_go,
    s_gl,
    s_gc,
    s_lb,
    s_lo,
    s_ll,
    s_db,
    s_do,
    s_dl,
    s_dc,
    others,
    length,
    key_channels,
    channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CK: tl.constexpr,
):
    seq = tl.program_id(0)
    b, o = seq // others, seq % others
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ck = tl.arange(0, BLOCK_CK)
    q, lse = _queries(
        q_ptr + b * s_qb + o * s_qo,
        lse_ptr + b * s_lb + o * s_lo,
        offs_m,
        offs_ck,
        s_ql,
        s_qc,
        s_ll,
        length,
        key_channels,
    )
    delta = tl.load(d_ptr + b * s_lb + o * s_lo + offs_m * s_ll, mask=offs_m < length, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_CK], tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ds = _score_gradients(
            q,
            lse,
            delta,
            k_ptr + b * s_kb + o * s_ko,
            v_ptr + b * s_vb + o * s_vo,
            g_ptr + b * s_gb + o * s_go,
            offs_m,
            offs_n,
            offs_ck,
            s_kl,
            s_kc,
            s_vl,
            s_vc,
            s_gl,
            s_gc,
            length,
            key_channels,
            channels,
            SKIP_CENTRE,
            PRECISION,
            UPCAST,
            BLOCK_M,
            BLOCK_N,
            BLOCK_C,
        )
        k = _tile(k_ptr + b * s_kb + o * s_ko, offs_n, offs_ck, s_kl, s_kc, length, key_channels)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
    _add_tile(dq_ptr + b * s_db + o * s_do, offs_m, offs_ck, s_dl, s_dc, length, key_channels, dq)


@triton.jit
def dk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    lse_ptr,
    d_ptr,
    dk_ptr,
    s_qb,
    s_qo,
    s_ql,
    s_qc,
    s_kb,
    s_ko,
    s_kl,
    s_kc,
    s_vb,
    s_vo,
    s_vl,
    s_vc,
    s_gb,
    s_go,
    s_gl,
    s_gc,
    s_lb,
    s_lo,
    s_ll,
    s_db,
    s_do,
    s_dl,
    s_dc,
    others,
    length,
    key_channels,
    channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CK: tl.constexpr,
):
    seq = tl.program_id(0)
    b, o = seq // others, seq % others
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_ck = tl.arange(0, BLOCK_CK)
    dk = tl.zeros([BLOCK_N, BLOCK_CK], tl.float32)
    for start in range(0, length, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q, lse = _queries(
            q_ptr + b * s_qb + o * s_qo,
            lse_ptr + b * s_lb + o * s_lo,
            offs_m,
            offs_ck,
            s_ql,
            s_qc,
            s_ll,
            length,
            key_channels,
        )
        delta = tl.load(d_ptr + b * s_lb + o * s_lo + offs_m * s_ll, mask=offs_m < length, other=0.0)
        ds = _score_gradients(
            q,
            lse,
            delta,
            k_ptr + b * s_kb + o * s_ko,
            v_ptr + b * s_vb + o * s_vo,
            g_ptr + b * s_gb + o * s_go,
            offs_m,
            offs_n,
            offs_ck,
            s_kl,
            s_kc,
            s_vl,
            s_vc,
            s_gl,
            s_gc,
            length,
            key_channels,
            channels,
            SKIP_CENTRE,
            PRECISION,
            UPCAST,
            BLOCK_M,
            BLOCK_N,
            BLOCK_C,
        )
        dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, UPCAST)
    _add_tile(dk_ptr + b * s_db + o * s_do, offs_n, offs_ck, s_dl, s_dc, length, key_channels, dk)


@triton.jit
def dv_kernel(
    q_ptr,
    k_ptr,
    g_ptr,
    lse_ptr,
    dv_ptr,
    s_qb,
    s_qo,
    s_ql,
    s_qc,
    s_kb,
    s_ko,
    s_kl,
    s_kc,
    s_gb,
    s_go,
    s_gl,
    s_gc,
    s_lb,
    s_lo,
    s_ll,
    s_db,
    s_do,
    s_dl,
    s_dc,
    others,
    length,
    key_channels,
    channels,
    SKIP_CENTRE: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_CK: tl.constexpr,
):
    seq = tl.program_id(0)
    b, o = seq // others, seq % others
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_ck = tl.arange(0, BLOCK_CK)
    dv = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for start in range(0, length, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q, lse = _queries(
            q_ptr + b * s_qb + o * s_qo,
            lse_ptr + b * s_lb + o * s_lo,
            offs_m,
            offs_ck,
            s_ql,
            s_qc,
            s_ll,
            length,
            key_channels,
        )
        s = _energies(
            q,
            k_ptr + b * s_kb + o * s_ko,
            offs_m,
            offs_n,
            offs_ck,
            s_kl,
            s_kc,
            length,
            key_channels,
            SKIP_CENTRE,
            PRECISION,
            UPCAST,
        )
        g = _tile(g_ptr + b * s_gb + o * s_go, offs_m, offs_c, s_gl, s_gc, length, channels)
        dv += _dot(tl.trans(_probabilities(s, lse)).to(g.dtype), g, PRECISION, UPCAST)
    _add_tile(dv_ptr + b * s_db + o * s_do, offs_n, offs_c, s_dl, s_dc, length, channels, dv)
