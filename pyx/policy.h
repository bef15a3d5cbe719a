/* cynorm's policy table: every size threshold that decides how a call runs, in one place.
 *
 * The kernels read these through pyx/core/policy.pxi; the Python front end through
 * cynorm._runtime.POLICY (the same values), so a threshold is changed here and nowhere else.
 * Each says what it decides, why, and which benchmarks/RESULTS.md item measured it.  They were
 * tuned on 2-core AMD EPYC VMs (Zen 3 and Zen 4, 32 MB L3); a machine with another cache size
 * may want other values.
 */
#ifndef CYNORM_POLICY_H
#define CYNORM_POLICY_H

/* ---- threads (front end, cynorm/_threads.py) ---- */
/* Inputs below this many elements run on the calling thread: waking the team costs more than
 * a second core saves (RESULTS item 11). */
#define CYNORM_SERIAL_BELOW (1 << 15)
/* BatchNorm runs two parallel regions (statistics, then normalization), so threads pay off
 * later (RESULTS item 11). */
#define CYNORM_BATCH_NORM_SERIAL_BELOW (1 << 17)

/* ---- layouts (front end, cynorm/functional.py) ---- */
/* BatchNorm on (A, C, L): rows of L >= this many contiguous elements are reduced one by one;
 * shorter ones (L == 1 is the (N, C) and (N, T, C) case) down the columns of (A, C*L). */
#define CYNORM_ROW_PATH_MIN 64
/* Rows per block of the column reduction: about this many bytes stay in L2 between its
 * passes. */
#define CYNORM_COLUMN_BLOCK_BYTES (1 << 17)

/* ---- statistics (kernels) ---- */
/* Elements per block of the row moments: 16 KiB of float64, fits L1. */
#define CYNORM_BLOCK 2048
/* Rows per block of the column reduction, at most. */
#define CYNORM_MAX_BLOCK_ROWS 1024
/* Rows of the float64 block that gives BatchNorm's float32 column sweep its shifts and
 * scales (the more rows it takes, the more of a small input goes through the slower float64
 * sweep; RESULTS item 48). */
#define CYNORM_FIRST_BLOCK_ROWS 16
/* Rows of the float32 sweep's blocks: read once each, so no need to stay in cache; long blocks
 * make the per-feature merges rare. */
#define CYNORM_SCALED_BLOCK_ROWS 128
/* LayerNorm rows up to this long are done CYNORM_SHORT_ROWS at a time (RESULTS item 22). */
#define CYNORM_SHORT_ROW 512
#define CYNORM_SHORT_ROWS 8

/* ---- stores (kernels, core/stores.pxi) ---- */
/* Outputs of at least this many bytes are written with streaming stores: they cannot stay in
 * the 32 MiB L3 anyway, and a normal store reads each line first (RESULTS items 18, 28, 36). */
#define CYNORM_STREAM_BYTES (24 << 20)
/* On one thread streaming starts here: one core reads its L3 no faster than memory, where two
 * cores read y back from the L3 faster than they wrote it (RESULTS items 28 and 36). */
#define CYNORM_STREAM_BYTES_ONE_THREAD (8 << 20)
/* LayerNorm inputs from this size read (mostly) from memory, even on 2 threads where streaming
 * starts later: their long rows prefetch the next one; smaller ones only paid for the chunks
 * (RESULTS items 69 and 70). */
#define CYNORM_PREFETCH_BYTES (8 << 20)
/* Elements of a LayerNorm row per prefetch of the next one (RESULTS item 69). */
#define CYNORM_PREFETCH_CHUNK 256
/* 16-bit rows (core/halves.pxi) prefetch the row at least this many bytes ahead, not the next
 * one: a row is read, widened and written in less time than its successor takes to arrive
 * from memory (RESULTS item 83). */
#define CYNORM_HALF_PREFETCH_AHEAD 16384

/* Elements of a row per step of the 16-bit affine (core/halves.pxi, BatchNorm's 16-bit
 * output): widened into a float32 scratch of this many, computed and narrowed while it is in
 * L1. */
#define CYNORM_AFFINE_CHUNK 2048
/* The 16-bit affine with one parameter set per column (core/halves.pxi's half_affine_rows)
 * takes blocks of AFFINE_CHUNK elements of whole rows sixteen columns at a time down the rows,
 * the columns' parameters in registers (core/halves.h's cynorm_affine_cols_half), where a
 * block holds at least this many rows; wider rows are taken along the row: walks of two rows
 * were slower for them, bfloat16 (4096, 768) in particular (RESULTS item 133). */
#define CYNORM_HALF_STRIP_ROWS 4
/* Eval-mode 16-bit BatchNorm with the features split among the threads (or on one thread),
 * one feature a column (core/halves.pxi's half_affine_columns): this many columns' parameters
 * made, then those columns written down every row, then the next block; the block's float32
 * parameters, 16 bytes a column, stay in L1 across the rows (RESULTS item 130). */
#define CYNORM_HALF_COLUMN_BLOCK 1024
/* Eval-mode BatchNorm (ops/batch_norm.pxi's normalize_running, core/halves.pxi's 16-bit
 * affine_half) with one feature a column and no more rows than features: from this many
 * features the threads split the features, each making its columns' parameters and
 * writing them down every row, not the rows (RESULTS items 125 and 127). */
#define CYNORM_FEATURE_SPLIT_MIN 1024
/* 16-bit rows read down the columns (BatchNorm's (N, C) layouts) go in blocks of this many
 * bytes as float32 rows, per thread: one Chan merge per block, and the per-thread scratch the
 * first block is widened into (the blocks after it are widened in registers; RESULTS items 96
 * and 103). */
#define CYNORM_HALF_COLUMN_BYTES (1 << 19)
/* Channels-first 16-bit GroupNorm / InstanceNorm (ops/group_norm_half.pxi) takes a sample's
 * groups in batches of about this many bytes of x: their moments, then all their channels'
 * parameters in one call (vectorized across the channels), then their output while they are
 * still in cache (RESULTS item 129). */
#define CYNORM_HALF_GROUP_BYTES (1 << 16)
/* Bytes of float32 per array (g, x, dx) that the 16-bit backward widens a block of rows into,
 * per thread, before the float32 backward runs over them (core/halves_backward.pxi; blocks are
 * at least four rows): smaller blocks stay in L1 between their widening, sums and dx, and
 * measured faster than 32 and 128 KiB ones (RESULTS item 99). */
#define CYNORM_HALF_BACKWARD_BYTES (1 << 13)

/* ---- BatchNorm backward (kernels, ops/batch_norm_backward.pxi) ---- */
/* Training by rows ((N, C, L) with long L) when g and x together outgrow GROUP_MIN_BYTES:
 * features a group at a time, while the group's rows of g and x (GROUP_BYTES of them) are
 * still in cache; only for groups of GROUP_MIN_FEATURES or more (RESULTS item 49). */
#define CYNORM_GROUP_MIN_BYTES (24 << 20)
#define CYNORM_GROUP_BYTES (4 << 20)
#define CYNORM_GROUP_MIN_FEATURES 4
/* Rows per step of the eval pass by rows: their sums, then their dx (RESULTS item 17). */
#define CYNORM_FUSED_ROWS 16

/* ---- GroupNorm / InstanceNorm (kernels, ops/group_norm.pxi) ---- */
/* The channels-last apply by column blocks: rows per block (a block stays in cache while its
 * columns are swept), and the longest rows it takes; longer rows measured faster row by row
 * (RESULTS item 79). */
#define CYNORM_APPLY_ROWS 64
#define CYNORM_APPLY_COLUMNS 64

/* ---- outputs (runtime, _pool.h) ---- */
/* Outputs of at least this many bytes come from the output cache; smaller ones are NumPy's
 * (malloc's free lists serve them well; RESULTS item 53). */
#define CYNORM_CACHED_OUTPUT_MIN (1 << 22)
/* Freed buffers the output cache keeps at most (its byte limit, 1 GiB or a sixteenth of the
 * machine's memory by default, is set at import: cynorm/_config.py). */
#define CYNORM_POOL_SLOTS 8

#endif /* CYNORM_POLICY_H */
