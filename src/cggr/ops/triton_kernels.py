"""Triton kernels: one online pass per row for the statistics, a gradient pass that reads
only the selected rows (one program per row each; rows are addressed as ``[B, T, V]`` with
arbitrary B and T strides and unit stride along V; offsets are int64), and one-program
selections over the statistics (``topk`` and ``random`` by radix select, ``importance``).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _absorb_block(x, start, target, m, second, s_acc, t_acc, q_acc,
                  BLOCK_V: tl.constexpr, NEED_SECOND: tl.constexpr, NEED_SUM_SQ: tl.constexpr, FOLD: tl.constexpr,
                  NEED_ENTROPY: tl.constexpr, HAS_TARGET: tl.constexpr = True):
    """Absorb one block of logits (float, -inf where masked; columns ``start + arange(BLOCK_V)``) into the
    running row state: the maximum ``m`` and runner-up ``second`` (scalars) and the per-lane
    sums. ``q`` leaves out the target column (see RowStats.sum_sq_other_prob); a block known not
    to hold it (``HAS_TARGET`` False) skips the per-element test. ``t`` (the entropy's sum) only
    with ``NEED_ENTROPY``: two of the dozen or so instructions per element.

    Exponents are taken in base 2, ``d = (x - m) log2 e`` as one fused multiply-add (one
    instruction less per element than ``exp``; the kernel is short of instructions): s and t
    are in base-2 units, and the shift by ``m`` is exact up to a common factor that cancels.
    The runner-up costs nothing per element: it is updated only for blocks whose maximum
    exceeds it, which after the first few blocks of a row are rare. The sums are folded to
    ``BLOCK_V // FOLD`` lanes (see :func:`_fold`)."""
    block_max = tl.max(x, 0)
    if NEED_SECOND:
        if block_max > second:  # uniform, and rare once the row's two largest are seen
            n_max = tl.sum((x == block_max).to(tl.int32), 0)
            block_second = tl.where(n_max > 1, block_max, tl.max(tl.where(x == block_max, float("-inf"), x), 0))
            second = tl.where(block_max > m, tl.maximum(m, block_second), block_max)
    if block_max > m:  # uniform branch: rescale only when the row maximum grows
        started = m != float("-inf")
        shift = tl.where(started, (m - block_max) * LOG2E, 0.0)
        alpha = tl.where(started, tl.exp2(shift), 0.0)
        if NEED_ENTROPY:
            t_acc = alpha * (t_acc + shift * s_acc)
        s_acc = alpha * s_acc
        if NEED_SUM_SQ:
            q_acc = alpha * alpha * q_acc
        m = block_max
    # m is -inf only while the whole row so far is. A -inf logit has d = -inf and e = 0; for t,
    # whose term is e * d, d is clamped at -1100 instead (2**-1100 is 0 even in float64), so that
    # it contributes exactly nothing without a select.
    d = x * LOG2E - tl.where(m == float("-inf"), 0.0, m * LOG2E)
    if NEED_ENTROPY:
        d = tl.maximum(d, -1100.0)
    e = tl.exp2(d)
    s_acc += _fold(e, BLOCK_V, FOLD)
    if NEED_ENTROPY:
        t_acc += _fold(e * d, BLOCK_V, FOLD)
    if NEED_SUM_SQ:
        if HAS_TARGET:
            q_acc += _fold(tl.where(tl.arange(0, BLOCK_V) == target - start, 0.0, e * e), BLOCK_V, FOLD)
        else:
            q_acc += _fold(e * e, BLOCK_V, FOLD)
    return m, second, s_acc, t_acc, q_acc


@triton.jit
def _wrapped(position, full_end, span):
    """A loop position (see row_stats_kernel) as a position in the row."""
    return position - tl.where(position >= full_end, span, 0)


@triton.jit
def _fold(values, BLOCK_V: tl.constexpr, FOLD: tl.constexpr):
    """Sum each run of FOLD adjacent lanes: ``[BLOCK_V] -> [BLOCK_V // FOLD]``. With FOLD the
    elements one thread loads at once the sum stays in the thread (the same adds as a full-width
    accumulator), and the accumulators take FOLD times fewer registers: more rows in flight
    (H200, ``combined``: 80% -> 96% of copy bandwidth)."""
    if FOLD == 1:
        return values
    else:
        return tl.sum(tl.reshape(values, (BLOCK_V // FOLD, FOLD)), 1)


@triton.jit
def _aligned_row(ptr, base, ALIGN: tl.constexpr):
    """(row pointer, shift) of the row at element offset ``base``, for ALIGN > 1: the elements
    per 16 bytes, when the tensor's pointer is 16-byte aligned but its rows' offsets (strides,
    and the ``offset`` of a view passed from the boundary before it) are not.
    The row is then read from the 16-byte boundary ``shift`` elements before its start, so
    that every block from position ALIGN on (column = position - shift) is read in whole
    16-byte vectors; positions before ALIGN are the caller's head. (With ALIGN = 1 the kernels
    use the row pointer itself: the strides make it 16-byte aligned, or nothing can.)"""
    return ptr + (base // ALIGN) * ALIGN, (base % ALIGN).to(tl.int32)


@triton.jit
def _tanh(u):
    """tanh without libdevice (which the interpreter lacks): expm1(2|u|) / (expm1(2|u|) + 2),
    |u| capped at 20 (tanh(20) is 1 in float64), the sign put back; NaN stays NaN."""
    e = _expm1(2.0 * tl.minimum(tl.abs(u), 20.0))
    t = e / (e + 2.0)
    t = tl.where(u < 0, -t, t)
    return tl.where(u != u, u, t)


@triton.jit
def _transform(x, scale, cap, TRANSFORM: tl.constexpr):
    """The logits every formula sees (cggr.scoring.transform_logits): TRANSFORM 0 none,
    1 ``x * scale``, 2 then ``cap * tanh(x / cap)``."""
    if TRANSFORM >= 1:
        x = x * scale
    if TRANSFORM == 2:
        x = cap * _tanh(x / cap)
    return x


@triton.jit
def _transform_slope(t, scale, cap, TRANSFORM: tl.constexpr):
    """d transformed / d x from the transformed logits ``t`` (cggr.scoring.transform_slope)."""
    if TRANSFORM == 2:
        r = t / cap
        return scale * (1.0 - r * r)
    else:
        return scale


@triton.jit
def row_stats_kernel(
    logits_ptr, targets_ptr, valid_ptr, ref_ptr, stats_ptr, ignore_index,
    seq_len, stride_b, stride_t, offset, vocab_size, eps_hi, eps_lo, z_hi, z_lo, scale_hi, scale_lo, cap_hi, cap_lo,
    BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr, SCORING: tl.constexpr,
    NEED_SECOND: tl.constexpr, NEED_SUM_SQ: tl.constexpr, STATS_WIDTH: tl.constexpr, FOLD: tl.constexpr,
    ALIGN: tl.constexpr, TRANSFORM: tl.constexpr, NEED_ENTROPY: tl.constexpr, VALID_FROM_TARGETS: tl.constexpr,
):
    """stats[row] = (lse, x[y], entropy, p1, p2, sum_{j != y} p_j^2, sum x, score, loss) (RowStats
    order); zeros on invalid rows, and in the optional fields that neither the scoring nor the
    caller reads (the entropy without NEED_ENTROPY), so unused accumulators cost nothing.
    ``score`` and ``loss`` are the epilogue of :func:`_score_and_loss`; label smoothing and z-loss
    come as float32 (hi, lo) pairs, so that float64 rows see them at full precision.

    The running maximum ``m`` is a scalar; the sums are kept per lane and reduced once at
    the end. ``t`` accumulates ``e * d`` (``d`` the shifted exponent) so that the entropy
    ``log S - t / S`` never subtracts two large numbers. ``sum x`` (always kept: one add) flags NaN and +inf rows.
    Full blocks are read with a one-block prefetch; one masked tail block follows. Row ``r``
    starts at ``offset + (r // seq_len) * stride_b + (r % seq_len) * stride_t``; with ``ALIGN``
    > 1 anywhere (see :func:`_aligned_row`). Targets, validity and the reference losses (read
    for the ``excess`` scoring only) are contiguous ``[B*T]`` vectors; with VALID_FROM_TARGETS the
    validity is ``target != ignore_index``, written to ``valid_ptr`` (a PyTorch comparison would
    cost the host a launch). Every logit goes through :func:`_transform` (logit scale and
    softcap) first; its float32 (hi, lo) pairs are joined like label smoothing's.
    """
    row = tl.program_id(0).to(tl.int64)
    base = offset + (row // seq_len) * stride_b + (row % seq_len) * stride_t
    target = tl.load(targets_ptr + row).to(tl.int64)
    target_col = tl.minimum(tl.maximum(target, -1), vocab_size).to(tl.int32)  # int32, like the positions
    if VALID_FROM_TARGETS:  # the validity is written here, from the targets, not read
        valid = target != ignore_index
        tl.store(valid_ptr + row, valid)
    else:
        valid = tl.load(valid_ptr + row) != 0
    cols = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    scale = _joined(scale_hi, scale_lo, ACC_DTYPE)
    cap = _joined(cap_hi, cap_lo, ACC_DTYPE)

    m = tl.max(tl.full((BLOCK_V,), neg_inf, ACC_DTYPE), 0)
    s_acc = tl.zeros((BLOCK_V // FOLD,), ACC_DTYPE)
    t_acc = tl.zeros((BLOCK_V // FOLD,), ACC_DTYPE)
    q_acc = tl.zeros((BLOCK_V // FOLD,), ACC_DTYPE)
    x_acc = tl.zeros((BLOCK_V // FOLD,), ACC_DTYPE)
    second = m
    if ALIGN > 1:  # the head: positions [shift, ALIGN), one block with at most ALIGN lanes read
        row_ptr, shift = _aligned_row(logits_ptr, base, ALIGN)
        first = ALIGN
        length = vocab_size + shift  # positions from row_ptr: column = position - shift
        head = (cols >= shift) & (cols < ALIGN) & (cols < length) & valid
        x = tl.load(row_ptr + cols, mask=head, other=neg_inf).to(ACC_DTYPE)
        x = tl.where(head, _transform(x, scale, cap, TRANSFORM), neg_inf)
        x_acc += _fold(tl.where(head, x, 0.0), BLOCK_V, FOLD)
        m, second, s_acc, t_acc, q_acc = _absorb_block(
            x, -shift, target_col, m, second, s_acc, t_acc, q_acc, BLOCK_V, NEED_SECOND, NEED_SUM_SQ, FOLD,
            NEED_ENTROPY)
        full_end = tl.where(valid, first + (tl.maximum(length - first, 0) // BLOCK_V) * BLOCK_V, first)
    else:
        row_ptr, shift, first, length = logits_ptr + base, 0, 0, vocab_size
        full_end = tl.where(valid, (vocab_size // BLOCK_V) * BLOCK_V, 0)
    # gradnorm's q leaves the target out. Rather than test every element for it, the loop visits
    # the full blocks in an order rotated to end just before the target's block (the sums do not
    # depend on the order), and that block follows the loop with the test. Positions p past
    # full_end wrap to p - span.
    span = full_end - first
    loop_first = first
    if NEED_SUM_SQ:
        target_pos = target_col + shift
        target_in_loop = (target_pos >= first) & (target_pos < full_end)
        target_start = tl.where(target_in_loop, first + ((target_pos - first) // BLOCK_V) * BLOCK_V, first)
        loop_first = tl.where(target_in_loop, target_start + BLOCK_V, first)
        loop_end = loop_first + tl.where(target_in_loop, span - BLOCK_V, span)
    else:
        loop_end = full_end
    # The next block's load is issued before this one is worked on (prefetch: 65% -> 80% of
    # copy bandwidth on an H100). Its masked lanes are never used, so they need no fill value.
    x_next = tl.load(row_ptr + _wrapped(loop_first, full_end, span) + cols, mask=loop_first + cols < loop_end)
    for p in range(loop_first, loop_end, BLOCK_V):
        x = _transform(x_next.to(ACC_DTYPE), scale, cap, TRANSFORM)
        ahead = p + BLOCK_V
        x_next = tl.load(row_ptr + _wrapped(ahead, full_end, span) + cols, mask=ahead + cols < loop_end)
        x_acc += _fold(x, BLOCK_V, FOLD)
        m, second, s_acc, t_acc, q_acc = _absorb_block(
            x, _wrapped(p, full_end, span) - shift, target_col, m, second, s_acc, t_acc, q_acc, BLOCK_V, NEED_SECOND,
            NEED_SUM_SQ, FOLD, NEED_ENTROPY, HAS_TARGET=False)
    if NEED_SUM_SQ:  # the target's block (all masked when the target is not in a full block)
        in_block = target_in_loop & (cols < BLOCK_V)
        x = tl.load(row_ptr + target_start + cols, mask=in_block, other=neg_inf).to(ACC_DTYPE)
        x = tl.where(in_block, _transform(x, scale, cap, TRANSFORM), neg_inf)
        x_acc += _fold(tl.where(in_block, x, 0.0), BLOCK_V, FOLD)
        m, second, s_acc, t_acc, q_acc = _absorb_block(
            x, target_start - shift, target_col, m, second, s_acc, t_acc, q_acc, BLOCK_V, NEED_SECOND, NEED_SUM_SQ,
            FOLD, NEED_ENTROPY)
    offs = full_end + cols
    in_row = (offs < length) & valid
    x = tl.load(row_ptr + offs, mask=in_row, other=neg_inf).to(ACC_DTYPE)
    x = tl.where(in_row, _transform(x, scale, cap, TRANSFORM), neg_inf)
    x_acc += _fold(tl.where(in_row, x, 0.0), BLOCK_V, FOLD)
    m, second, s_acc, t_acc, q_acc = _absorb_block(
        x, full_end - shift, target_col, m, second, s_acc, t_acc, q_acc, BLOCK_V, NEED_SECOND, NEED_SUM_SQ, FOLD,
        NEED_ENTROPY)

    # s and t are in base 2: lse = ln 2 (m log2 e + log2 S) and H = ln 2 (log2 S - t / S).
    total = tl.sum(s_acc, 0)
    lse = (m * LOG2E + tl.log2(total)) * LN2
    entropy = tl.where(NEED_ENTROPY, (tl.log2(total) - tl.sum(t_acc, 0) / total) * LN2, 0.0)
    sum_x = tl.sum(x_acc, 0)
    safe_target = tl.minimum(tl.maximum(target, 0), vocab_size - 1)
    target_logit = tl.load(logits_ptr + base + safe_target, mask=valid, other=0.0).to(ACC_DTYPE)
    target_logit = _transform(target_logit, scale, cap, TRANSFORM)
    if SCORING == EXCESS:
        reference = tl.load(ref_ptr + row, mask=valid, other=0.0).to(ACC_DTYPE)
    else:
        reference = target_logit  # never read

    p1 = tl.exp(m - lse)
    p2 = tl.where(NEED_SECOND, tl.exp(second - lse), 0.0)
    sum_sq = tl.where(NEED_SUM_SQ, tl.sum(q_acc, 0) / (total * total), 0.0)
    score, loss = _score_and_loss(lse, target_logit, entropy, p1, p2, sum_sq, sum_x, reference, vocab_size,
                                  _joined(eps_hi, eps_lo, ACC_DTYPE), _joined(z_hi, z_lo, ACC_DTYPE), SCORING)
    keep = valid & (sum_x == sum_x) & (sum_x != float("inf"))  # NaN / +inf rows: all NaN
    out = stats_ptr + row * STATS_WIDTH
    _store_stat(out + 0, lse, keep, valid)
    _store_stat(out + 1, target_logit, keep, valid)
    _store_stat(out + 2, entropy, keep, valid)
    _store_stat(out + 3, p1, keep, valid)
    _store_stat(out + 4, p2, keep, valid)
    _store_stat(out + 5, sum_sq, keep, valid)
    _store_stat(out + 6, sum_x, keep, valid)
    _store_stat(out + 7, score, keep, valid)
    _store_stat(out + 8, loss, keep, valid)


# Scoring codes (the order of cggr.scoring.SCORINGS).
ENTROPY = tl.constexpr(0)
MARGIN = tl.constexpr(1)
LOSS = tl.constexpr(2)
COMBINED = tl.constexpr(3)
GRADNORM = tl.constexpr(4)
EXCESS = tl.constexpr(5)


@triton.jit
def _score_and_loss(lse, target_logit, entropy, p1, p2, sum_sq, sum_x, reference, vocab_size, eps, z,
                    SCORING: tl.constexpr):
    """The row's difficulty and loss: the same formulas as cggr.scoring.difficulty and
    cggr.scoring.row_loss, which the tests hold these to. ``reference`` is the reference
    model's loss (``excess`` only)."""
    nll = lse - target_logit
    miss = -_expm1(target_logit - lse)  # 1 - p_y without cancellation
    if SCORING == EXCESS:
        u = nll - reference
        e = tl.exp(-tl.abs(u))  # a sigmoid that neither overflows nor loses small values
        score = tl.where(u >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif SCORING == GRADNORM:
        score = tl.sqrt(miss * miss + sum_sq) / 1.4142135623730951
    else:
        by_entropy = (entropy / tl.log(vocab_size.to(lse.dtype)) - p1 + 1.0) / 2.0
        by_margin = 1.0 - (p1 - p2)
        if SCORING == ENTROPY:
            score = by_entropy
        elif SCORING == MARGIN:
            score = by_margin
        elif SCORING == LOSS:
            score = miss
        else:
            score = (by_entropy + by_margin + miss) / 3.0
    score = tl.where(score != score, score, tl.minimum(tl.maximum(score, 0.0), 1.0))  # NaN stays NaN
    # Each term only when its factor is non-zero: 0 * inf would make a legal -inf logit NaN.
    loss = tl.where(eps != 0.0, (1.0 - eps) * nll + eps * (lse - sum_x / vocab_size), nll)
    loss = tl.where(z != 0.0, loss + z * lse * lse, loss)
    return score, loss


@triton.jit
def _joined(hi, lo, ACC_DTYPE: tl.constexpr):
    """A scalar passed as a float32 (hi, lo) pair, in the accumulation dtype."""
    return tl.cast(hi, ACC_DTYPE) + tl.cast(lo, ACC_DTYPE)


@triton.jit
def _expm1(u):
    """exp(u) - 1 accurate near 0 (Kahan's log trick); libdevice's expm1 does not run in the interpreter."""
    w = tl.exp(u)
    near_zero = tl.where(w == 1.0, u, (w - 1.0) * u / tl.log(w))
    return tl.where(w == 0.0, -1.0, near_zero)


@triton.jit
def _store_stat(ptr, value, keep, valid):
    tl.store(ptr, tl.where(keep, value, tl.where(valid, float("nan"), 0.0)))


@triton.jit
def logits_grad_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, coef_ptr, mask_ptr, scale_ptr,
    seq_len, stride_b, stride_t, grad_stride_b, grad_stride_t, offset, lse_stride, n_cols, vocab_size,
    eps_hi, eps_lo, z_hi, z_lo, scale_hi, scale_lo, cap_hi, cap_lo,
    BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr, SCALE_MODE: tl.constexpr, ALIGN: tl.constexpr,
    TRANSFORM: tl.constexpr,
):
    """grad[row] = scale * coef * (p (1 + 2 z lse) - eps / V - (1 - eps) onehot(y)) on selected
    rows; unselected rows are written with zeros and their logits are never read. ``scale`` is
    the upstream gradient: 1 (SCALE_MODE 0), ``scale_ptr[0]`` (1) or ``scale_ptr[row]`` (2).
    Rows hold ``n_cols`` consecutive columns of ``vocab_size`` (all of them but in the linear
    path's recomputation of a vocabulary slice), targets counted from the first of them; both
    tensors' rows start ``offset`` elements after their pointers (as in :func:`row_stats_kernel`).
    With a logit scale or softcap (TRANSFORM) the formula sees the transformed logits and the
    result is multiplied by the transform's slope (the chain rule).

    A row is written as: a head (ALIGN > 1, see :func:`_aligned_row`; logits and gradient rows
    share their shift), blocks up to its last whole 16-byte vector, and the last partial
    vector, so that only the head and the last vector are read and written element-wise."""
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    t = row % seq_len
    base = offset + b * stride_b + t * stride_t
    grad_base = offset + b * grad_stride_b + t * grad_stride_t
    if ALIGN > 1:
        in_ptr, shift = _aligned_row(logits_ptr, base, ALIGN)
        out_ptr, _ = _aligned_row(grad_ptr, grad_base, ALIGN)
        first = ALIGN
    else:
        in_ptr, out_ptr, shift, first = logits_ptr + base, grad_ptr + grad_base, 0, 0
    selected = tl.load(mask_ptr + row) != 0
    target = tl.load(targets_ptr + row).to(tl.int32) + shift  # as a position (int32: positions are, in registers)
    lse = tl.load(lse_ptr + row * lse_stride).to(ACC_DTYPE)
    coef = tl.load(coef_ptr + row).to(ACC_DTYPE)
    if SCALE_MODE == 1:
        coef *= tl.load(scale_ptr).to(ACC_DTYPE)
    elif SCALE_MODE == 2:
        coef *= tl.load(scale_ptr + row).to(ACC_DTYPE)
    label_smoothing = _joined(eps_hi, eps_lo, ACC_DTYPE)
    p_scale = 1.0 + 2.0 * _joined(z_hi, z_lo, ACC_DTYPE) * lse
    smooth = label_smoothing / vocab_size
    length = n_cols + shift  # positions from the row pointers: column = position - shift
    scale = _joined(scale_hi, scale_lo, ACC_DTYPE)
    cap = _joined(cap_hi, cap_lo, ACC_DTYPE)
    if selected:  # uniform branch: unselected rows only store zeros
        _grad_row(in_ptr, out_ptr, length, first, shift, target, lse, coef, p_scale, smooth, label_smoothing,
                  scale, cap, BLOCK_V, ACC_DTYPE, ALIGN, TRANSFORM, True)
    else:
        _grad_row(in_ptr, out_ptr, length, first, shift, target, lse, coef, p_scale, smooth, label_smoothing,
                  scale, cap, BLOCK_V, ACC_DTYPE, ALIGN, TRANSFORM, False)


@triton.jit
def _grad_row(in_ptr, out_ptr, length, first, shift, target, lse, coef, p_scale, smooth, label_smoothing, scale, cap,
              BLOCK_V: tl.constexpr, ACC_DTYPE: tl.constexpr, ALIGN: tl.constexpr, TRANSFORM: tl.constexpr,
              SELECTED: tl.constexpr):
    """One row's positions [shift, length): the head (ALIGN > 1), blocks up to the last whole
    vector (masked, but in whole vectors), and the last partial vector (ALIGN > 1)."""
    if ALIGN > 1:
        head = tl.arange(0, ALIGN)
        _grad_piece(in_ptr, out_ptr, head, (head >= shift) & (head < length), target, lse, coef, p_scale, smooth,
                    label_smoothing, scale, cap, ACC_DTYPE, TRANSFORM, SELECTED)
        vectors_end = tl.maximum((length // ALIGN) * ALIGN, first)
    else:
        vectors_end = length
    cols = tl.arange(0, BLOCK_V)
    for start in range(first, vectors_end, BLOCK_V):
        offs = start + cols
        _grad_piece(in_ptr, out_ptr, offs, offs < vectors_end, target, lse, coef, p_scale, smooth, label_smoothing,
                    scale, cap, ACC_DTYPE, TRANSFORM, SELECTED)
    if ALIGN > 1:
        last = vectors_end + tl.arange(0, ALIGN)
        _grad_piece(in_ptr, out_ptr, last, last < length, target, lse, coef, p_scale, smooth, label_smoothing,
                    scale, cap, ACC_DTYPE, TRANSFORM, SELECTED)


@triton.jit
def _grad_piece(in_ptr, out_ptr, offs, mask, target, lse, coef, p_scale, smooth, label_smoothing, scale, cap,
                ACC_DTYPE: tl.constexpr, TRANSFORM: tl.constexpr, SELECTED: tl.constexpr):
    """The gradient at one row's positions ``offs`` where ``mask``; zeros on an unselected row
    (not SELECTED), whose logits are not read."""
    if SELECTED:
        x = _transform(tl.load(in_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE), scale, cap, TRANSFORM)
        g = tl.exp(x - lse) * p_scale - smooth - tl.where(offs == target, 1.0 - label_smoothing, 0.0)
        if TRANSFORM > 0:
            g = g * _transform_slope(x, scale, cap, TRANSFORM)
        value = coef * g
    else:
        value = tl.zeros(offs.shape, ACC_DTYPE)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _count_set(flags_ptr, n_rows, CHUNK: tl.constexpr):
    """How many of the ``n_rows`` bool flags are set (int64)."""
    cols = tl.arange(0, CHUNK)
    count = tl.sum(tl.zeros((CHUNK,), tl.int64), 0)
    for start in range(0, n_rows, CHUNK):
        offs = start + cols
        count += tl.sum((tl.load(flags_ptr + offs, mask=offs < n_rows, other=0) != 0).to(tl.int64), 0)
    return count


@triton.jit
def _budget(valid_ptr, ratio_ptr, ratio_bits, n_rows, RATIO_FROM_PTR: tl.constexpr, CHUNK: tl.constexpr):
    """(n_valid, k, ratio): the valid count, k = min(n_valid, max(1, ceil(ratio * n_valid - 1e-6)))
    in float64, and the ratio (float64: read from ``ratio_ptr``, or the bits of a Python float)."""
    n_valid = _count_set(valid_ptr, n_rows, CHUNK)
    if RATIO_FROM_PTR:
        ratio = tl.load(ratio_ptr).to(tl.float64)
    else:
        ratio = ratio_bits.to(tl.float64, bitcast=True)
    wanted = n_valid.to(tl.float64) * ratio - 1e-6
    k = wanted.to(tl.int64)  # the ceiling without libdevice
    k = k + (k.to(tl.float64) < wanted).to(tl.int64)
    return n_valid, tl.minimum(tl.maximum(k, 1), n_valid), ratio


@triton.jit
def select_topk_kernel(
    keys_ptr, stats_ptr, valid_ptr, forced_ptr, ratio_ptr, ratio_bits,
    mask_ptr, weight_ptr, coef_ptr, row_loss_ptr, loss_ptr, n_valid_ptr, n_selected_ptr, n_rows,
    KEY_STRIDE: tl.constexpr, KEYS_ARE_SCORES: tl.constexpr, STATS_WIDTH: tl.constexpr, LOSS_COL: tl.constexpr,
    RATIO_FROM_PTR: tl.constexpr, REDUCTION: tl.constexpr, CHUNK: tl.constexpr, ONE_STEP: tl.constexpr,
    FORCED: tl.constexpr,
):
    """The k rows of largest key, ties to the lower row index, and the reduction, in one program:
    k from the valid count, the k-th largest key by a 4-pass radix select on its bits, then
    mask, weight, coefficient and loss. Replaces a few dozen small PyTorch ops, whose launches
    cost the host more than this costs the GPU.

    The keys are the float32 scores (``topk``; in [0, 1], NaN ranked as +inf, so their bits
    order like the numbers) or non-negative int32 random keys (``random``), ``KEY_STRIDE``
    apart. With FORCED (``sequence_aware``) the valid rows where ``forced_ptr`` is set rank
    above every other row and k becomes max(k, their count), so they are all kept and the rest
    of the budget goes to the largest keys. REDUCTION: 0 mean, 1 sum, 2 none. ``n_valid``
    and ``n_selected`` receive the counts. Rows are walked CHUNK at a time; when they all fit one step
    (ONE_STEP) their keys are read once and kept in registers."""
    cols = tl.arange(0, CHUNK)
    if ONE_STEP:
        first_key, first_valid = _selection_key(keys_ptr, valid_ptr, forced_ptr, cols, n_rows, KEY_STRIDE,
                                                KEYS_ARE_SCORES, FORCED)
    else:  # never read: every step loads its own keys
        first_key, first_valid = cols, cols < 0
    n_valid, k, ratio = _budget(valid_ptr, ratio_ptr, ratio_bits, n_rows, RATIO_FROM_PTR, CHUNK)
    if FORCED:  # the forced rows are valid ones (cggr.selection.forced_rows)
        k = tl.maximum(k, _count_set(forced_ptr, n_rows, CHUNK))
    prefix, remaining = _kth_largest(first_key, first_valid, keys_ptr, valid_ptr, forced_ptr, n_rows, k, n_valid,
                                     KEY_STRIDE, KEYS_ARE_SCORES, CHUNK, ONE_STEP, FORCED)

    if REDUCTION == 0:
        scale = 1.0 / tl.maximum(k, 1).to(tl.float32)
    else:
        scale = 1.0
    taken = tl.sum(tl.zeros((CHUNK,), tl.int64), 0)
    total = tl.sum(tl.zeros((CHUNK,), tl.float32), 0)
    for start in range(0, n_rows, CHUNK):
        offs = start + cols
        in_range = offs < n_rows
        key, valid = _step_keys(first_key, first_valid, keys_ptr, valid_ptr, forced_ptr, offs, n_rows, KEY_STRIDE,
                                KEYS_ARE_SCORES, ONE_STEP, FORCED)
        chosen, taken = _take(key, valid, prefix, remaining, taken)
        row_loss = tl.load(stats_ptr + offs.to(tl.int64) * STATS_WIDTH + LOSS_COL, mask=in_range, other=0.0)
        weighted = tl.where(chosen, row_loss, 0.0)
        total += tl.sum(weighted, 0)
        weight = chosen.to(tl.float32)
        tl.store(mask_ptr + offs, chosen, mask=in_range)
        tl.store(weight_ptr + offs, weight, mask=in_range)
        tl.store(coef_ptr + offs, weight * scale, mask=in_range)
        if REDUCTION == 2:
            tl.store(row_loss_ptr + offs, weighted, mask=in_range)
    tl.store(loss_ptr, total * scale)
    tl.store(n_valid_ptr, n_valid)
    tl.store(n_selected_ptr, k)


@triton.jit
def _kth_largest(first_key, first_valid, keys_ptr, valid_ptr, forced_ptr, n_rows, k, n_valid,
                 KEY_STRIDE: tl.constexpr, KEYS_ARE_SCORES: tl.constexpr, CHUNK: tl.constexpr,
                 ONE_STEP: tl.constexpr, FORCED: tl.constexpr):
    """(prefix, remaining): the k-th largest key of the valid rows, by a 4-pass radix select on
    its bits, and how many rows equal to it are kept (the first ones). When every valid row is
    kept (k >= n_valid) no search is needed: prefix is -1, below every key. For 0 < k."""
    cols = tl.arange(0, CHUNK)
    # prefix: the high bits of the k-th largest key found so far; remaining: rows still to place
    # at or below it.
    prefix = tl.sum(tl.zeros((CHUNK,), tl.int32), 0) - 1
    remaining = k - k
    if k < n_valid:
        prefix = prefix + 1
        remaining = k
        for digit_index in tl.static_range(4):
            hist = tl.zeros((256,), tl.int32)
            for start in range(0, n_rows, CHUNK):
                key, valid = _step_keys(first_key, first_valid, keys_ptr, valid_ptr, forced_ptr, start + cols,
                                        n_rows, KEY_STRIDE, KEYS_ARE_SCORES, ONE_STEP, FORCED)
                hist += _digit_histogram(key, valid, prefix, digit_index)
            prefix, remaining = _next_digit(hist, prefix, remaining, digit_index)
    return prefix, remaining


@triton.jit
def _digit_histogram(key, valid, prefix, digit_index: tl.constexpr):
    """How many of the rows ``valid`` whose higher digits match ``prefix``'s have each value of
    digit ``digit_index`` (8 bits, the highest first) of ``key``."""
    shift = 24 - 8 * digit_index
    if digit_index > 0:
        valid = valid & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
    return tl.histogram((key >> shift) & 255, 256, mask=valid)


@triton.jit
def _next_digit(hist, prefix, remaining, digit_index: tl.constexpr):
    """(prefix, remaining) after digit ``digit_index`` of the radix select: the digit under
    which the ``remaining``-th largest row falls, given its histogram, and how many rows still
    to place at or below the new prefix."""
    bins = tl.arange(0, 256)
    at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # rows whose digit is >= each bin
    digit = tl.max(tl.where(at_least >= remaining, bins, 0), 0)
    remaining -= tl.sum(tl.where(bins > digit, hist, 0), 0)
    return prefix | (digit << (24 - 8 * digit_index)), remaining


@triton.jit
def _take(key, valid, prefix, remaining, taken):
    """(chosen, taken): of the rows of one step, those above the threshold key ``prefix`` and the
    first ``remaining`` equal to it, counting the ``taken`` ties of earlier steps."""
    tie = valid & (key == prefix)
    tie_rank = taken + tl.cumsum(tie.to(tl.int64), 0) - tie.to(tl.int64)
    chosen = valid & ((key > prefix) | (tie & (tie_rank < remaining)))
    return chosen, taken + tl.sum(tie.to(tl.int64), 0)


@triton.jit
def forced_rows_kernel(scores_ptr, valid_ptr, forced_ptr, seq_len, min_rows,
                       SCORE_STRIDE: tl.constexpr, CHUNK: tl.constexpr, ONE_STEP: tl.constexpr):
    """``sequence_aware``'s forced rows (cggr.selection.forced_rows), one program a sequence: its
    ``min(min_rows, its valid count)`` rows of largest score, NaN largest, ties to the lower
    row, found as :func:`select_topk_kernel` finds its k. Scores are ``SCORE_STRIDE`` apart;
    sequences are ``seq_len`` consecutive rows."""
    first_row = tl.program_id(0).to(tl.int64) * seq_len
    scores_ptr += first_row * SCORE_STRIDE
    valid_ptr += first_row
    forced_ptr += first_row
    cols = tl.arange(0, CHUNK)
    if ONE_STEP:
        first_key, first_valid = _topk_key(scores_ptr, valid_ptr, cols, seq_len, SCORE_STRIDE, True)
    else:  # never read: every step loads its own keys
        first_key, first_valid = cols, cols < 0
    n_valid = _count_set(valid_ptr, seq_len, CHUNK)
    k = tl.minimum(n_valid, min_rows)
    prefix, remaining = _kth_largest(first_key, first_valid, scores_ptr, valid_ptr, valid_ptr, seq_len, k, n_valid,
                                     SCORE_STRIDE, True, CHUNK, ONE_STEP, False)
    taken = k - k
    for start in range(0, seq_len, CHUNK):
        offs = start + cols
        key, valid = _step_keys(first_key, first_valid, scores_ptr, valid_ptr, valid_ptr, offs, seq_len,
                                SCORE_STRIDE, True, ONE_STEP, False)
        chosen, taken = _take(key, valid, prefix, remaining, taken)
        tl.store(forced_ptr + offs, chosen & (k > 0), mask=offs < seq_len)


@triton.jit
def _step_keys(first_key, first_valid, keys_ptr, valid_ptr, forced_ptr, offs, n_rows, KEY_STRIDE: tl.constexpr,
               KEYS_ARE_SCORES: tl.constexpr, ONE_STEP: tl.constexpr, FORCED: tl.constexpr):
    """The keys of rows ``offs``: those read at the start when there is one step only."""
    if ONE_STEP:
        key, valid = first_key, first_valid
    else:
        key, valid = _selection_key(keys_ptr, valid_ptr, forced_ptr, offs, n_rows, KEY_STRIDE, KEYS_ARE_SCORES,
                                    FORCED)
    return key, valid


@triton.jit
def _selection_key(keys_ptr, valid_ptr, forced_ptr, offs, n_rows, KEY_STRIDE: tl.constexpr,
                   KEYS_ARE_SCORES: tl.constexpr, FORCED: tl.constexpr):
    """:func:`_topk_key`, with the forced rows' keys raised above every score's (FORCED)."""
    key, valid = _topk_key(keys_ptr, valid_ptr, offs, n_rows, KEY_STRIDE, KEYS_ARE_SCORES)
    if FORCED:
        forced = tl.load(forced_ptr + offs, mask=offs < n_rows, other=0) != 0
        key = tl.where(forced, 0x7FFFFFFF, key)
    return key, valid


@triton.jit
def _topk_key(keys_ptr, valid_ptr, offs, n_rows, KEY_STRIDE: tl.constexpr, KEYS_ARE_SCORES: tl.constexpr):
    """(int32 key, validity) of rows ``offs``: a score's bits (NaN as +inf, -0.0 as 0), or the
    int32 key itself."""
    in_range = offs < n_rows
    valid = (tl.load(valid_ptr + offs, mask=in_range, other=0) != 0) & in_range
    if KEYS_ARE_SCORES:
        score = tl.load(keys_ptr + offs.to(tl.int64) * KEY_STRIDE, mask=in_range, other=0.0) + 0.0
        score = tl.where(score != score, float("inf"), score)
        key = score.to(tl.int32, bitcast=True)
    else:
        key = tl.load(keys_ptr + offs.to(tl.int64) * KEY_STRIDE, mask=in_range, other=0)
    return key, valid


@triton.jit
def _radix_top(key, valid, k):
    """Which of the rows ``valid`` are among the ``k`` of largest non-negative int32 ``key``,
    ties to the lower row index (one block of rows): a 4-pass radix select for the k-th key,
    then the first ``remaining`` rows equal to it."""
    prefix = tl.sum(tl.zeros(key.shape, tl.int32), 0)
    remaining = k
    for digit_index in tl.static_range(4):
        prefix, remaining = _next_digit(_digit_histogram(key, valid, prefix, digit_index), prefix, remaining,
                                        digit_index)
    chosen, _ = _take(key, valid, prefix, remaining, k - k)
    return chosen & (k > 0)


@triton.jit
def select_stratified_kernel(
    stats_ptr, valid_ptr, keys_ptr, ratio_ptr, ratio_bits,
    mask_ptr, weight_ptr, coef_ptr, row_loss_ptr, loss_ptr, n_valid_ptr, n_selected_ptr, n_rows, num_strata,
    partial_ptr, arrived_ptr,
    STATS_WIDTH: tl.constexpr, SCORE_COL: tl.constexpr, LOSS_COL: tl.constexpr, RATIO_FROM_PTR: tl.constexpr,
    REDUCTION: tl.constexpr, CHUNK: tl.constexpr, STRATA: tl.constexpr,
):
    """The whole ``stratified`` selection and reduction for at most CHUNK rows, one program a
    stratum (cggr.selection.select_stratified computes the same in PyTorch ops). Program ``s``
    finds its stratum's rows by radix selects of the hardest rows at its two boundaries, the
    shares by largest remainder with caps (over STRATA >= num_strata lanes), then its share of
    rows of largest random key ``keys_ptr`` (int32), and writes its rows (program 0 also the
    invalid ones). The loss: each program stores its partial sum in ``partial_ptr[s]`` and
    counts itself in ``arrived_ptr`` (zero before the launch); the last to arrive adds the
    partials in stratum order, so the sum does not depend on timing."""
    stratum = tl.program_id(0)
    cols = tl.arange(0, CHUNK)
    in_range = cols < n_rows
    score_key, valid = _topk_key(stats_ptr + SCORE_COL, valid_ptr, cols, n_rows, STATS_WIDTH, True)
    n_valid, k, ratio = _budget(valid_ptr, ratio_ptr, ratio_bits, n_rows, RATIO_FROM_PTR, CHUNK)
    q = n_valid // num_strata
    r = n_valid - q * num_strata
    # This stratum holds the rows ranked [first, last) hardest first: the first r strata q + 1 rows.
    first = stratum * q + tl.minimum(stratum, r)
    last = first + q + (stratum < r).to(q.dtype)
    harder = valid & (cols < 0)
    if first > 0:
        harder = _radix_top(score_key, valid, first)
    mine = valid & ~harder
    if last < n_valid:
        mine = mine & _radix_top(score_key, valid, last)

    lanes = tl.arange(0, STRATA)
    real = lanes < num_strata
    sizes = tl.where(real, q + (lanes < r).to(q.dtype), 0)
    w = tl.where(real, num_strata - lanes, 0).to(q.dtype)
    exact = k * w
    share = exact // (num_strata * (num_strata + 1) // 2)
    remainder = exact - share * (num_strata * (num_strata + 1) // 2)
    leftover = k - tl.sum(share, 0)
    # Largest remainder first, ties to the harder (lower) stratum.
    ahead = ((remainder[None, :] > remainder[:, None]) | ((remainder[None, :] == remainder[:, None])
                                                        & (lanes[None, :] < lanes[:, None]))) & real[None, :]
    rank = tl.sum(ahead.to(tl.int32), 1)
    share = share + ((rank < leftover) & real).to(share.dtype)
    capped = tl.minimum(share, sizes)
    excess = tl.sum(share - capped, 0)
    room = sizes - capped
    room_before = tl.cumsum(room, 0) - room
    final = capped + tl.minimum(tl.maximum(excess - room_before, 0), room)
    n_selected = tl.sum(final, 0)

    random_key = tl.load(keys_ptr + cols, mask=in_range, other=0)
    chosen = _radix_top(random_key, mine, tl.sum(tl.where(lanes == stratum, final, 0), 0))
    if REDUCTION == 0:
        scale = 1.0 / tl.maximum(n_selected, 1).to(tl.float32)
    else:
        scale = 1.0
    row_loss = tl.load(stats_ptr + cols.to(tl.int64) * STATS_WIDTH + LOSS_COL, mask=in_range, other=0.0)
    weighted = tl.where(chosen, row_loss, 0.0)
    weight = chosen.to(tl.float32)
    written = in_range & (mine | ((stratum == 0) & ~valid))
    tl.store(mask_ptr + cols, chosen, mask=written)
    tl.store(weight_ptr + cols, weight, mask=written)
    tl.store(coef_ptr + cols, weight * scale, mask=written)
    if REDUCTION == 2:
        tl.store(row_loss_ptr + cols, weighted, mask=written)
    tl.store(partial_ptr + stratum, tl.sum(weighted, 0))
    if stratum == 0:
        tl.store(n_valid_ptr, n_valid)
        tl.store(n_selected_ptr, n_selected)
    # acq_rel: the partial above is visible to the last program, which sees every other's.
    if tl.atomic_add(arrived_ptr, 1, sem="acq_rel") == num_strata - 1:
        partials = tl.load(partial_ptr + lanes, mask=real, other=0.0, volatile=True)
        tl.store(loss_ptr, tl.sum(partials, 0) * scale)


@triton.jit
def _importance_score(stats_ptr, valid_ptr, offs, n_rows, STATS_WIDTH: tl.constexpr, SCORE_COL: tl.constexpr):
    """(float64 score of rows ``offs``: NaN as 1, at least 1e-6, 0 where invalid; validity)."""
    in_range = offs < n_rows
    valid = (tl.load(valid_ptr + offs, mask=in_range, other=0) != 0) & in_range
    score = tl.load(stats_ptr + offs.to(tl.int64) * STATS_WIDTH + SCORE_COL, mask=in_range, other=0.0)
    score = tl.where(score != score, 1.0, score).to(tl.float64)
    return tl.where(valid, tl.maximum(score, 1e-6), 0.0), valid


@triton.jit
def _importance_sums(first_s, first_valid, stats_ptr, valid_ptr, n_rows, c, pi_min,
                     STATS_WIDTH: tl.constexpr, SCORE_COL: tl.constexpr, CHUNK: tl.constexpr,
                     ONE_STEP: tl.constexpr):
    """(sum of clamp(c s, pi_min, 1), rows at 1, rows at pi_min, sum of the others' s) over valid rows."""
    cols = tl.arange(0, CHUNK)
    total = tl.sum(tl.zeros((CHUNK,), tl.float64), 0)
    middle = total
    n_top = tl.sum(tl.zeros((CHUNK,), tl.int64), 0)
    n_floor = n_top
    for start in range(0, n_rows, CHUNK):
        if ONE_STEP:
            s, valid = first_s, first_valid
        else:
            s, valid = _importance_score(stats_ptr, valid_ptr, start + cols, n_rows, STATS_WIDTH, SCORE_COL)
        raw = c * s
        top = valid & (raw >= 1.0)
        floor = valid & (raw <= pi_min) & ~top
        total += tl.sum(tl.where(valid, tl.minimum(tl.maximum(raw, pi_min), 1.0), 0.0), 0)
        n_top += tl.sum(top.to(tl.int64), 0)
        n_floor += tl.sum(floor.to(tl.int64), 0)
        middle += tl.sum(tl.where(valid & ~top & ~floor, s, 0.0), 0)
    return total, n_top, n_floor, middle


@triton.jit
def select_importance_kernel(
    stats_ptr, valid_ptr, ratio_ptr, ratio_bits, u_ptr,
    mask_ptr, weight_ptr, coef_ptr, row_loss_ptr, loss_ptr, n_valid_ptr, n_selected_ptr, n_rows,
    STATS_WIDTH: tl.constexpr, SCORE_COL: tl.constexpr, LOSS_COL: tl.constexpr,
    RATIO_FROM_PTR: tl.constexpr, REDUCTION: tl.constexpr, CHUNK: tl.constexpr, ONE_STEP: tl.constexpr,
    ITERATIONS: tl.constexpr,
):
    """The whole ``importance`` selection and reduction in one program (float32 statistics):
    pi_i = clamp(c s_i, pi_min, 1) with sum pi = k, then systematic sampling with the uniform
    ``u_ptr[0]`` and weights 1 / pi (cggr.selection.importance_probabilities and
    systematic_sample compute the same in PyTorch ops).

    c is bracketed by bisection of log c over [2**-80, 2**21] (ITERATIONS halvings, the midpoint
    a geometric mean), then solved exactly on the bracket's clamping pattern, where sum pi is
    linear in c. Sums are float64."""
    cols = tl.arange(0, CHUNK)
    if ONE_STEP:
        first_s, first_valid = _importance_score(stats_ptr, valid_ptr, cols, n_rows, STATS_WIDTH, SCORE_COL)
    else:  # never read
        first_s, first_valid = cols.to(tl.float64), cols < 0
    n_valid, k, ratio = _budget(valid_ptr, ratio_ptr, ratio_bits, n_rows, RATIO_FROM_PTR, CHUNK)
    pi_min = 0.05 * ratio
    kf = k.to(tl.float64)
    c = tl.sum(tl.zeros((CHUNK,), tl.float64), 0) + 1.0
    if k < n_valid:
        lo = c * 8.271806125530277e-25  # 2**-80
        hi = c * 2097152.0  # 2**21: every score of at least 1e-6 gives pi = 1
        for _ in range(ITERATIONS):
            mid = tl.sqrt(lo * hi)
            total, _n_top, _n_floor, _middle = _importance_sums(
                first_s, first_valid, stats_ptr, valid_ptr, n_rows, mid, pi_min, STATS_WIDTH, SCORE_COL, CHUNK,
                ONE_STEP)
            below = total < kf
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        c = tl.sqrt(lo * hi)
        _total, n_top, n_floor, middle = _importance_sums(
            first_s, first_valid, stats_ptr, valid_ptr, n_rows, c, pi_min, STATS_WIDTH, SCORE_COL, CHUNK, ONE_STEP)
        solved = (kf - n_top.to(tl.float64) - pi_min * n_floor.to(tl.float64)) / middle
        c = tl.where(middle > 0.0, tl.minimum(tl.maximum(solved, lo), hi), c)

    u = tl.load(u_ptr)
    if REDUCTION == 0:
        scale = 1.0 / tl.maximum(n_valid, 1).to(tl.float64)
    else:
        scale = tl.sum(tl.zeros((CHUNK,), tl.float64), 0) + 1.0
    carry = tl.sum(tl.zeros((CHUNK,), tl.float64), 0)
    total_loss = carry
    n_selected = tl.sum(tl.zeros((CHUNK,), tl.int64), 0)
    for start in range(0, n_rows, CHUNK):
        offs = start + cols
        in_range = offs < n_rows
        if ONE_STEP:
            s, valid = first_s, first_valid
        else:
            s, valid = _importance_score(stats_ptr, valid_ptr, offs, n_rows, STATS_WIDTH, SCORE_COL)
        pi = tl.minimum(tl.maximum(c * s, pi_min), 1.0)
        pi = tl.where(valid, tl.where(k >= n_valid, 1.0, pi), 0.0)
        running = carry + tl.cumsum(pi, 0)
        before = running - pi
        # C + u >= 0, so truncation is the floor.
        chosen = valid & ((pi >= 1.0) | ((running + u).to(tl.int64) > (before + u).to(tl.int64)))
        carry += tl.sum(pi, 0)
        weight = tl.where(chosen, 1.0 / tl.maximum(pi, 1e-30), 0.0)
        row_loss = tl.load(stats_ptr + offs.to(tl.int64) * STATS_WIDTH + LOSS_COL, mask=in_range, other=0.0)
        weighted = tl.where(chosen, weight * row_loss.to(tl.float64), 0.0)
        total_loss += tl.sum(weighted, 0)
        n_selected += tl.sum(chosen.to(tl.int64), 0)
        tl.store(mask_ptr + offs, chosen, mask=in_range)
        tl.store(weight_ptr + offs, weight.to(tl.float32), mask=in_range)
        tl.store(coef_ptr + offs, (weight * scale).to(tl.float32), mask=in_range)
        if REDUCTION == 2:
            tl.store(row_loss_ptr + offs, weighted.to(tl.float32), mask=in_range)
    tl.store(loss_ptr, (total_loss * scale).to(tl.float32))
    tl.store(n_valid_ptr, n_valid)
    tl.store(n_selected_ptr, n_selected)


@triton.jit
def scale_kernel(scale_ptr, out_ptr, src_ptr, n_elements, out1_ptr, src1_ptr, n1, out2_ptr, src2_ptr, n2,
                 BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr, IN_PLACE: tl.constexpr, COUNT: tl.constexpr):
    """``out += scale * src`` (ACCUMULATE) or ``out = scale * src`` for the first COUNT (1 to 3)
    of the (out, src, n) triples, ``scale`` read from memory; each program walks every
    ``num_programs``-th block of each. The second form in place (IN_PLACE: ``src`` is ``out``)
    with a scale of 1 stores nothing, and with few programs costs next to nothing (autograd's
    usual upstream gradient). (PyTorch's own multiply by a 0-d tensor takes a strided path:
    about 2.5 times the copy time.)"""
    scale = tl.load(scale_ptr).to(tl.float32)
    if ACCUMULATE or not IN_PLACE or scale != 1.0:
        _scale_span(out_ptr, src_ptr, n_elements, scale, BLOCK, ACCUMULATE)
        if COUNT > 1:
            _scale_span(out1_ptr, src1_ptr, n1, scale, BLOCK, ACCUMULATE)
        if COUNT > 2:
            _scale_span(out2_ptr, src2_ptr, n2, scale, BLOCK, ACCUMULATE)


@triton.jit
def _scale_span(out_ptr, src_ptr, n_elements, scale, BLOCK: tl.constexpr, ACCUMULATE: tl.constexpr):
    """:func:`scale_kernel` over one tensor: this program's blocks."""
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n_elements, step):
        offs = start + tl.arange(0, BLOCK)
        in_range = offs < n_elements
        value = scale * tl.load(src_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        if ACCUMULATE:
            value += tl.load(out_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def count_bad_targets_kernel(targets_ptr, out_ptr, n, vocab_size, ignore_index, BLOCK: tl.constexpr):
    """``out[program]`` = how many of the ``[n]`` targets this program reads are neither in
    [0, vocab_size) nor ``ignore_index``; each program walks every ``num_programs``-th block."""
    program = tl.program_id(0)
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(program.to(tl.int64) * BLOCK, n, tl.num_programs(0).to(tl.int64) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        target = tl.load(targets_ptr + offs, mask=offs < n, other=0).to(tl.int64)  # 0: in range (V >= 2)
        count += ((target != ignore_index) & ((target < 0) | (target >= vocab_size))).to(tl.int32)
    tl.store(out_ptr + program, tl.sum(count, 0))
