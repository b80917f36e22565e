"""The Triton kernel of the triton backend: a whole ``fused_step`` in one launch.

Grid (1-D), in this order so that the dual work is scheduled first and overlaps the primal work:

    [0, S)        sample programs: each scatters SAMPLE_BLOCK constraint samples of one block into a
                  zeroed accumulator workspace (atomic adds of a count and a sum per constraint).
    [S, S + P)    primal programs: each updates PRIMAL_TILES * PRIMAL_BLOCK elements of one parameter
                  tensor (pointer table + chunk owner table; fp32 math whatever the storage dtype).
    (one idle program when S = P = 0 but Adam step counts still have to advance)

Finalisation, in the same launch, split in S chunks (chunk c = the samples sample program c scattered):
the multiplier update of a chunk may run once every sample is scattered.  Chunks are claimed from a
ticket, by (1) the last sample program to finish scattering, (2) any primal program that finds the
scatter complete when it is done with its own chunk, and (3) the last program of the launch, which
finishes whatever is left, then advances the Adam step counts (every program has read them by then)
and resets the tickets.  Within a chunk, each touched constraint is updated exactly once: a 64-bit
exchange reads and clears its (count, sum) pair, and only the first sample of an id gets a nonzero
count back.  Statistics are accumulated with atomics into rows that program 0 zeroed before it
signalled its scatter.  Step counts, grad_scale and found_inf are read on the device: no host sync.

Memory ordering on a GPU: every ticket is a scalar ``atomic_add(sem="acq_rel")``, before which Triton
places a CTA barrier and after which it broadcasts the result through shared memory behind another
barrier: the pattern of CUTLASS's semaphore (barrier, then one thread releases/acquires at gpu
scope).  So a program's scatter atomics and stats zeroing happen before its SCATTERED release, and a
finaliser's exchanges (served by L2) happen after its acquire of a complete SCATTERED count.

Layouts shared with the host code (``triton_backend.py``): int64 tables are row-major
``(rows, columns)`` with one column per tensor or block; parameter/gradient/state rows hold element
offsets from the ``anchor`` argument, the step row holds addresses; float64 settings are ``(columns, 9)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Rows of the int64 per-tensor table.
TENSOR_PARAM: tl.constexpr = tl.constexpr(0)
TENSOR_GRAD: tl.constexpr = tl.constexpr(1)
TENSOR_EXP_AVG: tl.constexpr = tl.constexpr(2)
TENSOR_EXP_AVG_SQ: tl.constexpr = tl.constexpr(3)
TENSOR_MAX_EXP_AVG_SQ: tl.constexpr = tl.constexpr(4)
TENSOR_STEP: tl.constexpr = tl.constexpr(5)
TENSOR_NUMEL: tl.constexpr = tl.constexpr(6)
TENSOR_FIRST_CHUNK: tl.constexpr = tl.constexpr(7)
TENSOR_DTYPE: tl.constexpr = tl.constexpr(8)
TENSOR_ROWS: tl.constexpr = tl.constexpr(9)

# Columns of the float64 per-tensor settings (derived values computed in float64 by triton_backend.py,
# on the host or on the device, as the reference computes them from Python floats).
P_LR: tl.constexpr = tl.constexpr(0)
P_BETA1: tl.constexpr = tl.constexpr(1)  # SGD: momentum
P_BETA2: tl.constexpr = tl.constexpr(2)  # SGD: dampening
P_EPS: tl.constexpr = tl.constexpr(3)
P_WEIGHT_DECAY: tl.constexpr = tl.constexpr(4)
P_ONE_MINUS_BETA1: tl.constexpr = tl.constexpr(5)
P_ONE_MINUS_BETA2: tl.constexpr = tl.constexpr(6)  # SGD: 1 - dampening
P_DECAY_FACTOR: tl.constexpr = tl.constexpr(7)  # 1 - lr * weight_decay
P_FLAGS: tl.constexpr = tl.constexpr(8)
PRIMAL_SETTINGS: tl.constexpr = tl.constexpr(9)

# Rows of the int64 per-block table.
BLOCK_MULTIPLIERS: tl.constexpr = tl.constexpr(0)
BLOCK_DUAL_STATE: tl.constexpr = tl.constexpr(1)
BLOCK_IDS: tl.constexpr = tl.constexpr(2)
BLOCK_VIOLATIONS: tl.constexpr = tl.constexpr(3)
BLOCK_NUM_SAMPLES: tl.constexpr = tl.constexpr(4)
BLOCK_FIRST_PROGRAM: tl.constexpr = tl.constexpr(5)
BLOCK_ACCUMULATOR_OFFSET: tl.constexpr = tl.constexpr(6)
BLOCK_RUNNING_SUMS: tl.constexpr = tl.constexpr(7)  # rows S and N of the dual state (RUNNING), else unused
BLOCK_RUNNING_COUNTS: tl.constexpr = tl.constexpr(8)
BLOCK_ROWS: tl.constexpr = tl.constexpr(9)

# Columns of the float64 per-block settings.
D_LR: tl.constexpr = tl.constexpr(0)
D_KP: tl.constexpr = tl.constexpr(1)
D_KI: tl.constexpr = tl.constexpr(2)
D_NU: tl.constexpr = tl.constexpr(3)
D_DAMPING: tl.constexpr = tl.constexpr(4)
D_LOWER: tl.constexpr = tl.constexpr(5)
D_UPPER: tl.constexpr = tl.constexpr(6)
D_DECAY: tl.constexpr = tl.constexpr(7)
D_ONE_MINUS_NU: tl.constexpr = tl.constexpr(8)
D_FLAGS: tl.constexpr = tl.constexpr(9)
DUAL_SETTINGS: tl.constexpr = tl.constexpr(10)

# Storage dtype codes of parameter tensors (and bits of the DTYPES constexpr: 1 << code).
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

# contract.py's flag bits, as constexprs the kernel can test.
AMSGRAD: tl.constexpr = tl.constexpr(1)
MAXIMIZE: tl.constexpr = tl.constexpr(2)
NESTEROV: tl.constexpr = tl.constexpr(4)
DECOUPLED_WEIGHT_DECAY: tl.constexpr = tl.constexpr(8)
FIRST_MOMENTUM_STEP: tl.constexpr = tl.constexpr(16)
MEAN: tl.constexpr = tl.constexpr(1)
NUPI: tl.constexpr = tl.constexpr(2)
RESTART: tl.constexpr = tl.constexpr(4)
FROZEN: tl.constexpr = tl.constexpr(8)
RUNNING: tl.constexpr = tl.constexpr(16)

ADAM: tl.constexpr = tl.constexpr(1)

# Accumulator workspace: per constraint slot, one int64 word = int32 count (low half) and the fp32
# bits of the sum (high half), so that one 64-bit exchange reads and clears both.
ACCUMULATOR_WORDS: tl.constexpr = tl.constexpr(2)  # int32 words per slot

# Tickets (int32 counters, zero between launches).
SCATTERED: tl.constexpr = tl.constexpr(0)  # sample programs done scattering
NEXT_CHUNK: tl.constexpr = tl.constexpr(1)  # next finalisation chunk to claim
FINISHED: tl.constexpr = tl.constexpr(2)  # programs done
TICKETS: tl.constexpr = tl.constexpr(3)


@triton.jit
def fused_step_kernel(
    tensor_table, chunk_owner, primal_settings, num_tensors, num_primal_programs,
    block_table, sample_owner, dual_settings, num_blocks, num_sample_programs,
    accumulators, tickets, stats, grad_scale, found_inf, anchor,
    ALGORITHM: tl.constexpr, DTYPES: tl.constexpr, ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, HAS_BLOCKS: tl.constexpr, COUNT_STEPS: tl.constexpr,
    PRIMAL_BLOCK: tl.constexpr, PRIMAL_TILES: tl.constexpr, SAMPLE_BLOCK: tl.constexpr,
    FINAL_BLOCK: tl.constexpr, HELPER_CHUNK_LIMIT: tl.constexpr,
):
    pid = tl.program_id(0)
    skipped = False
    if HAS_FOUND_INF:
        skipped = tl.load(found_inf) != 0
    if skipped:
        if pid == 0:
            _zero_stats(stats, num_blocks, FINAL_BLOCK)
    else:
        if pid < num_sample_programs:
            if pid == 0:
                _zero_stats(stats, num_blocks, FINAL_BLOCK)
            _scatter_samples(pid, block_table, sample_owner, num_blocks, accumulators, SAMPLE_BLOCK)
            if tl.atomic_add(tickets + SCATTERED, 1, sem="acq_rel") == num_sample_programs - 1:
                _finalise_chunks(HELPER_CHUNK_LIMIT, block_table, sample_owner, dual_settings, num_blocks,
                                 num_sample_programs, accumulators, tickets, stats, SAMPLE_BLOCK, FINAL_BLOCK)
        elif pid < num_sample_programs + num_primal_programs:
            _update_chunk(pid - num_sample_programs, anchor, tensor_table, chunk_owner, primal_settings,
                          num_tensors, grad_scale, ALGORITHM, DTYPES, ALIGNED, HAS_GRAD_SCALE, PRIMAL_BLOCK,
                          PRIMAL_TILES)
            if HAS_BLOCKS:
                if tl.atomic_add(tickets + SCATTERED, 0, sem="acq_rel") == num_sample_programs:
                    _finalise_chunks(HELPER_CHUNK_LIMIT, block_table, sample_owner, dual_settings, num_blocks,
                                     num_sample_programs, accumulators, tickets, stats, SAMPLE_BLOCK, FINAL_BLOCK)
        if HAS_BLOCKS or COUNT_STEPS:
            if tl.atomic_add(tickets + FINISHED, 1, sem="acq_rel") == tl.num_programs(0) - 1:
                if HAS_BLOCKS:
                    _finalise_chunks(0, block_table, sample_owner, dual_settings, num_blocks, num_sample_programs,
                                     accumulators, tickets, stats, SAMPLE_BLOCK, FINAL_BLOCK)
                if COUNT_STEPS:
                    _advance_steps(tensor_table, num_tensors, FINAL_BLOCK)
                for ticket in tl.static_range(TICKETS):
                    tl.atomic_xchg(tickets + ticket, 0)


# --------------------------------------------------------------------------------------------------
# Dual side


@triton.jit
def _zero_stats(stats, num_blocks, BLOCK: tl.constexpr):
    for start in range(0, num_blocks * 3, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(stats + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < num_blocks * 3)


@triton.jit
def _scatter_samples(pid, block_table, sample_owner, num_blocks, accumulators, BLOCK: tl.constexpr):
    block = tl.load(sample_owner + pid)
    if block >= 0:  # -1: the placeholder program of a step whose blocks have no samples
        ids = tl.load(block_table + BLOCK_IDS * num_blocks + block).to(tl.pointer_type(tl.int64))
        violations = tl.load(block_table + BLOCK_VIOLATIONS * num_blocks + block).to(tl.pointer_type(tl.float32))
        num_samples = tl.load(block_table + BLOCK_NUM_SAMPLES * num_blocks + block)
        first_program = tl.load(block_table + BLOCK_FIRST_PROGRAM * num_blocks + block)
        offset = tl.load(block_table + BLOCK_ACCUMULATOR_OFFSET * num_blocks + block)
        offs = (pid - first_program).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        k = tl.load(ids + offs, mask=offs < num_samples, other=-1)
        mask = (offs < num_samples) & (k >= 0)  # -1: padding, no sample (contract.py)
        e = tl.load(violations + offs, mask=mask, other=0.0)
        slot = ACCUMULATOR_WORDS * (offset + k)
        tl.atomic_add(accumulators + slot, 1, mask=mask, sem="relaxed")
        sums = accumulators.to(tl.pointer_type(tl.float32), bitcast=True)
        tl.atomic_add(sums + slot + 1, e, mask=mask, sem="relaxed")


@triton.jit
def _finalise_chunks(LIMIT: tl.constexpr, block_table, sample_owner, dual_settings, num_blocks, num_chunks,
                     accumulators, tickets, stats, SAMPLE_BLOCK: tl.constexpr, FINAL_BLOCK: tl.constexpr):
    """Claims and finalises chunks until none is left (or LIMIT were done; 0: no limit)."""
    done = 0
    chunk = tl.atomic_add(tickets + NEXT_CHUNK, 1, sem="relaxed")
    while chunk < num_chunks:
        _finalise_chunk(chunk, block_table, sample_owner, dual_settings, num_blocks, accumulators, stats,
                        SAMPLE_BLOCK, FINAL_BLOCK)
        done += 1
        if LIMIT == 0 or done < LIMIT:
            chunk = tl.atomic_add(tickets + NEXT_CHUNK, 1, sem="relaxed")
        else:
            chunk = num_chunks


@triton.jit
def _finalise_chunk(chunk, block_table, sample_owner, dual_settings, num_blocks, accumulators, stats,
                    SAMPLE_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.load(sample_owner + chunk)
    if block >= 0:
        multipliers = tl.load(block_table + BLOCK_MULTIPLIERS * num_blocks + block).to(tl.pointer_type(tl.float32))
        # The dual state's first row: nuPI's smoothed errors (contract.dual_state_rows).
        smoothed_errors = tl.load(block_table + BLOCK_DUAL_STATE * num_blocks + block).to(
            tl.pointer_type(tl.float32))
        running_sums = tl.load(block_table + BLOCK_RUNNING_SUMS * num_blocks + block).to(
            tl.pointer_type(tl.float32))
        running_counts = tl.load(block_table + BLOCK_RUNNING_COUNTS * num_blocks + block).to(
            tl.pointer_type(tl.float32))
        ids = tl.load(block_table + BLOCK_IDS * num_blocks + block).to(tl.pointer_type(tl.int64))
        num_samples = tl.load(block_table + BLOCK_NUM_SAMPLES * num_blocks + block)
        first_program = tl.load(block_table + BLOCK_FIRST_PROGRAM * num_blocks + block)
        offset = tl.load(block_table + BLOCK_ACCUMULATOR_OFFSET * num_blocks + block)
        settings = dual_settings + block * DUAL_SETTINGS
        lr = tl.load(settings + D_LR).to(tl.float32)
        kp = tl.load(settings + D_KP).to(tl.float32)
        ki = tl.load(settings + D_KI).to(tl.float32)
        nu = tl.load(settings + D_NU).to(tl.float32)
        damping = tl.load(settings + D_DAMPING).to(tl.float32)
        lower = tl.load(settings + D_LOWER).to(tl.float32)
        upper = tl.load(settings + D_UPPER).to(tl.float32)
        one_minus_nu = tl.load(settings + D_ONE_MINUS_NU).to(tl.float32)
        decay = tl.load(settings + D_DECAY).to(tl.float32)
        flags = tl.load(settings + D_FLAGS).to(tl.int32)
        updates = (flags & FROZEN) == 0
        nupi = (flags & NUPI) != 0
        running = (flags & (RUNNING | FROZEN)) == RUNNING
        pairs = accumulators.to(tl.pointer_type(tl.int64), bitcast=True) + offset
        start = (chunk - first_program).to(tl.int64) * SAMPLE_BLOCK
        touched = tl.zeros([BLOCK], dtype=tl.float32)
        worst = tl.zeros([BLOCK], dtype=tl.float32)
        positive = tl.zeros([BLOCK], dtype=tl.float32)
        for part in tl.static_range(SAMPLE_BLOCK // BLOCK):
            if start + part * BLOCK < num_samples:
                offs = start + part * BLOCK + tl.arange(0, BLOCK)
                k = tl.load(ids + offs, mask=offs < num_samples, other=-1)
                in_range = (offs < num_samples) & (k >= 0)  # -1: padding, no sample (contract.py)
                # Loaded before the claim so that the memory round trips overlap; only claimed lanes
                # are used.  (tl.where, not `&`: the interpreter mishandles a block `&` a scalar.)
                lam_mask = tl.where(updates, in_range, False)
                lam = tl.load(multipliers + k, mask=lam_mask, other=0.0)
                smoothed_error = tl.load(smoothed_errors + k, mask=tl.where(nupi, lam_mask, False), other=0.0)
                old_sum = tl.load(running_sums + k, mask=tl.where(running, lam_mask, False), other=0.0)
                old_count = tl.load(running_counts + k, mask=tl.where(running, lam_mask, False), other=0.0)
                # Exactly once per constraint: a duplicate id finds the pair already exchanged to 0.
                pair = tl.atomic_xchg(pairs + k, tl.zeros([BLOCK], dtype=tl.int64), mask=in_range,
                                      sem="relaxed")
                count = (pair & 0xFFFFFFFF).to(tl.int32)
                total = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
                claimed = in_range & (count > 0)
                g = total
                if (flags & MEAN) != 0:
                    g = tl.div_rn(total, tl.maximum(count, 1).to(tl.float32))
                if running:
                    running_sum = decay * old_sum + total
                    running_count = decay * old_count + count.to(tl.float32)
                    tl.store(running_sums + k, running_sum, mask=claimed)
                    tl.store(running_counts + k, running_count, mask=claimed)
                    g = tl.div_rn(running_sum, tl.where(claimed, running_count, 1.0))
                if updates:
                    direction = g
                    if nupi:
                        new_smoothed_error = nu * smoothed_error + one_minus_nu * g
                        direction = ki * g + kp * (new_smoothed_error - smoothed_error)
                        tl.store(smoothed_errors + k, new_smoothed_error, mask=claimed)
                    lam = lam + lr * (direction - damping * lam)
                    lam = tl.minimum(tl.maximum(lam, lower), upper)
                    if (flags & RESTART) != 0:
                        lam = tl.where(g <= 0, 0.0, lam)
                    tl.store(multipliers + k, lam, mask=claimed)
                measure = tl.where(lower < 0, tl.abs(g), tl.maximum(g, 0.0))
                touched += claimed.to(tl.float32)
                worst = tl.maximum(worst, tl.where(claimed, measure, 0.0))
                positive += (claimed & (measure > 0)).to(tl.float32)
        row = stats + block * 3
        tl.atomic_add(row, tl.sum(touched), sem="relaxed")
        tl.atomic_max(row + 1, tl.max(worst), sem="relaxed")
        tl.atomic_add(row + 2, tl.sum(positive), sem="relaxed")


# --------------------------------------------------------------------------------------------------
# Primal side


@triton.jit
def _update_chunk(chunk, anchor, tensor_table, chunk_owner, primal_settings, num_tensors, grad_scale,
                  ALGORITHM: tl.constexpr, DTYPES: tl.constexpr, ALIGNED: tl.constexpr,
                  HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    tensor = tl.load(chunk_owner + chunk)
    dtype = tl.load(tensor_table + TENSOR_DTYPE * num_tensors + tensor)
    # One branch per storage dtype present in this call (a constexpr mask): mixed-dtype models still
    # take one launch, and each program runs exactly one branch.  The last argument is how many
    # elements make 16 bytes (the alignment the host checked when ALIGNED).
    if DTYPES & 1:
        if dtype == 0:
            _update_tiles(chunk, tensor, anchor, tensor_table, primal_settings, num_tensors, grad_scale,
                          tl.float32, 4, ALGORITHM, ALIGNED, HAS_GRAD_SCALE, BLOCK, TILES)
    if DTYPES & 2:
        if dtype == 1:
            _update_tiles(chunk, tensor, anchor, tensor_table, primal_settings, num_tensors, grad_scale,
                          tl.bfloat16, 8, ALGORITHM, ALIGNED, HAS_GRAD_SCALE, BLOCK, TILES)
    if DTYPES & 4:
        if dtype == 2:
            _update_tiles(chunk, tensor, anchor, tensor_table, primal_settings, num_tensors, grad_scale,
                          tl.float16, 8, ALGORITHM, ALIGNED, HAS_GRAD_SCALE, BLOCK, TILES)


@triton.jit
def _tensor_pointer(anchor, tensor_table, row, num_tensors, tensor, DTYPE: tl.constexpr,
                    ELEMENTS_PER_16_BYTES: tl.constexpr, ALIGNED: tl.constexpr):
    # Tensors are addressed as anchor + element offset rather than by casting their address: Triton
    # keeps the divisibility of a pointer argument through the offset (an int-to-pointer cast loses
    # it), which is what lets full tiles use 16-byte vector loads.
    offset = tl.load(tensor_table + row * num_tensors + tensor)
    if ALIGNED:
        offset = tl.multiple_of(offset, ELEMENTS_PER_16_BYTES)
    return anchor.to(tl.pointer_type(DTYPE), bitcast=True) + offset


@triton.jit
def _update_tiles(chunk, tensor, anchor, tensor_table, primal_settings, num_tensors, grad_scale,
                  DTYPE: tl.constexpr, ELEMENTS_PER_16_BYTES: tl.constexpr, ALGORITHM: tl.constexpr,
                  ALIGNED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    param = _tensor_pointer(anchor, tensor_table, TENSOR_PARAM, num_tensors, tensor, DTYPE, ELEMENTS_PER_16_BYTES,
                            ALIGNED)
    grad = _tensor_pointer(anchor, tensor_table, TENSOR_GRAD, num_tensors, tensor, DTYPE, ELEMENTS_PER_16_BYTES,
                           ALIGNED)
    exp_avg = _tensor_pointer(anchor, tensor_table, TENSOR_EXP_AVG, num_tensors, tensor, DTYPE,
                              ELEMENTS_PER_16_BYTES, ALIGNED)
    numel = tl.load(tensor_table + TENSOR_NUMEL * num_tensors + tensor)
    first_chunk = tl.load(tensor_table + TENSOR_FIRST_CHUNK * num_tensors + tensor)
    settings = primal_settings + tensor * PRIMAL_SETTINGS
    flags = tl.load(settings + P_FLAGS).to(tl.int32)
    lr = tl.load(settings + P_LR)
    weight_decay = tl.load(settings + P_WEIGHT_DECAY).to(tl.float32)
    inv_scale = 1.0
    if HAS_GRAD_SCALE:
        inv_scale = (1.0 / tl.load(grad_scale).to(tl.float64)).to(tl.float32)
    start = (chunk - first_chunk).to(tl.int64) * (BLOCK * TILES)
    if ALGORITHM == ADAM:
        exp_avg_sq = _tensor_pointer(anchor, tensor_table, TENSOR_EXP_AVG_SQ, num_tensors, tensor, DTYPE,
                                     ELEMENTS_PER_16_BYTES, ALIGNED)
        max_exp_avg_sq = _tensor_pointer(anchor, tensor_table, TENSOR_MAX_EXP_AVG_SQ, num_tensors, tensor, DTYPE,
                                         ELEMENTS_PER_16_BYTES, ALIGNED)
        step_count = tl.load(tensor_table + TENSOR_STEP * num_tensors + tensor).to(tl.pointer_type(tl.float32))
        # This call's step is the stored count + 1; the last program of the launch stores it.
        step = tl.load(step_count).to(tl.float64) + 1.0
        beta1 = tl.load(settings + P_BETA1)
        beta2 = tl.load(settings + P_BETA2)
        bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2))).to(tl.float32)
        step_size = (-lr / bias_correction1).to(tl.float32)
        for tile in tl.static_range(TILES):
            offs = start + tile * BLOCK + tl.arange(0, BLOCK)
            # Full tiles unmasked (vector loads); only a tensor's last tile is masked.
            if start + (tile + 1) * BLOCK <= numel:
                _adam_tile(param + offs, grad + offs, exp_avg + offs, exp_avg_sq + offs, max_exp_avg_sq + offs,
                           None, settings, flags, weight_decay, inv_scale, beta2.to(tl.float32),
                           bias_correction2_sqrt, step_size, DTYPE)
            elif start + tile * BLOCK < numel:
                _adam_tile(param + offs, grad + offs, exp_avg + offs, exp_avg_sq + offs, max_exp_avg_sq + offs,
                           offs < numel, settings, flags, weight_decay, inv_scale, beta2.to(tl.float32),
                           bias_correction2_sqrt, step_size, DTYPE)
    else:
        neg_lr = (-lr).to(tl.float32)
        for tile in tl.static_range(TILES):
            offs = start + tile * BLOCK + tl.arange(0, BLOCK)
            if start + (tile + 1) * BLOCK <= numel:
                _sgd_tile(param + offs, grad + offs, exp_avg + offs, None, settings, flags, weight_decay, inv_scale,
                          neg_lr, DTYPE)
            elif start + tile * BLOCK < numel:
                _sgd_tile(param + offs, grad + offs, exp_avg + offs, offs < numel, settings, flags, weight_decay,
                          inv_scale, neg_lr, DTYPE)


@triton.jit
def _adam_tile(param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs, mask, settings, flags,
               weight_decay, inv_scale, beta2, bias_correction2_sqrt, step_size, DTYPE: tl.constexpr):
    p = tl.load(param_ptrs, mask=mask).to(tl.float32)
    g = tl.load(grad_ptrs, mask=mask).to(tl.float32) * inv_scale
    m = tl.load(exp_avg_ptrs, mask=mask).to(tl.float32)
    v = tl.load(exp_avg_sq_ptrs, mask=mask).to(tl.float32)
    if (flags & MAXIMIZE) != 0:
        g = -g
    if weight_decay != 0:
        if (flags & DECOUPLED_WEIGHT_DECAY) != 0:
            p = p * tl.load(settings + P_DECAY_FACTOR).to(tl.float32)
        else:
            g = g + weight_decay * p
    m = _lerp(m, g, tl.load(settings + P_ONE_MINUS_BETA1).to(tl.float32))
    v = v * beta2 + tl.load(settings + P_ONE_MINUS_BETA2).to(tl.float32) * g * g
    second_moment = v
    if (flags & AMSGRAD) != 0:
        v_max = tl.maximum(tl.load(max_exp_avg_sq_ptrs, mask=mask).to(tl.float32), v)
        tl.store(max_exp_avg_sq_ptrs, round_to(v_max, DTYPE), mask=mask)
        second_moment = v_max
    eps = tl.load(settings + P_EPS).to(tl.float32)
    denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(step_size * m, denom)
    tl.store(param_ptrs, round_to(p, DTYPE), mask=mask)
    tl.store(exp_avg_ptrs, round_to(m, DTYPE), mask=mask)
    tl.store(exp_avg_sq_ptrs, round_to(v, DTYPE), mask=mask)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in DTYPE.  bf16 is rounded with integer arithmetic (what the
    GPU's cvt.rn.bf16.f32 does) because the interpreter's own fp32 -> bf16 cast truncates."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        result = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        result = x.to(DTYPE)
    return result


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's two-sided formula, so that results match torch.optim.Adam to the last bit or so.
    if weight < 0.5:
        result = start + weight * (end - start)
    else:
        result = end - (end - start) * (1.0 - weight)
    return result


@triton.jit
def _sgd_tile(param_ptrs, grad_ptrs, buffer_ptrs, mask, settings, flags, weight_decay, inv_scale, neg_lr,
              DTYPE: tl.constexpr):
    p = tl.load(param_ptrs, mask=mask).to(tl.float32)
    direction = tl.load(grad_ptrs, mask=mask).to(tl.float32) * inv_scale
    if (flags & MAXIMIZE) != 0:
        direction = -direction
    if weight_decay != 0:
        direction = direction + weight_decay * p
    momentum = tl.load(settings + P_BETA1).to(tl.float32)
    if momentum != 0:
        if (flags & FIRST_MOMENTUM_STEP) != 0:
            buffer = direction
        else:
            buffer = tl.load(buffer_ptrs, mask=mask).to(tl.float32)
            buffer = buffer * momentum + tl.load(settings + P_ONE_MINUS_BETA2).to(tl.float32) * direction
        tl.store(buffer_ptrs, round_to(buffer, DTYPE), mask=mask)
        if (flags & NESTEROV) != 0:
            direction = direction + momentum * buffer
        else:
            direction = buffer
    p = p + neg_lr * direction
    tl.store(param_ptrs, round_to(p, DTYPE), mask=mask)


@triton.jit
def _advance_steps(tensor_table, num_tensors, BLOCK: tl.constexpr):
    for start in range(0, num_tensors, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_tensors
        steps = tl.load(tensor_table + TENSOR_STEP * num_tensors + offs, mask=mask, other=0)
        step_ptrs = steps.to(tl.pointer_type(tl.float32))
        tl.store(step_ptrs, tl.load(step_ptrs, mask=mask) + 1.0, mask=mask)
