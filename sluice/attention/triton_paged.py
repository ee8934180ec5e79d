"""The CUDA attention path: the AttentionBackend that plans and launches the Triton kernels of
triton_kernels.py (K/V writes into the paged cache; paged attention over a whole mixed batch of
prefill chunks and decodes, read through block tables, with GQA).

Launch plans, all decided on the host from shapes and host ints (so CUDA graphs can hold them), once
per step by ``TritonPagedBackend.plan`` (the model runner puts the plan in the step's metadata):
  * decode-only batches: one launch, the decode config, program i = request i;
  * mostly decodes with short chunks: one launch, the small row tile;
  * batches with real prompt chunks: two launches, requests whose query fits one small row tile
    with the decode config, the rest with the large row tile.

Split KV (flash-decoding): each program's context may be split over ``num_splits`` programs
whose partial results a second kernel merges. Decode-only batches split when they have too
few programs to fill the GPU; mixed batches split when some context is long (a prompt chunk
at 32K positions is a handful of programs that each walk the whole context while the rest of
the GPU idles). Each program uses ``used = cdiv(tiles, max(cdiv(tiles, num_splits), min_split))``
splits of its own context (min_split: 1 KV tile in decode-only batches, 4 in mixed ones), so short
rows use one split, write their output directly, and the merge skips them; the count depends on
device values only, so a graph captured with any split count serves every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from sluice.attention.backend import AttentionMetadata
from sluice.attention.kv_quant import kv_scales_of
from sluice.attention.triton_kernels import merge_splits_kernel, paged_attention_kernel, write_kv_kernel

LOG2E = 1.4426950408889634
MAX_SPLITS = 16


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Launch shape for one batch kind; the defaults were picked on the H100 (benchmarks/notes)."""
    block_m: int
    tile_n: int
    num_warps: int
    num_stages: int


DECODE_CONFIG = KernelConfig(block_m=16, tile_n=128, num_warps=4, num_stages=3)
# Mixed batches: mostly decodes (a few short chunks) keep the small row tile; batches with
# real prefill work take the larger one, which runs the tensor cores 3x better on prefill.
MOSTLY_DECODE_CONFIG = KernelConfig(block_m=16, tile_n=64, num_warps=4, num_stages=2)
MIXED_CONFIG = KernelConfig(block_m=64, tile_n=64, num_warps=4, num_stages=2)
MOSTLY_DECODE_TOKENS_PER_REQ = 4  # num_tokens <= this x num_reqs counts as mostly decodes ...
# ... unless a chunk is longer than this: its attention over a long context re-reads every K/V tile
# once per BLOCK_Q tokens, and the small row tile (4 tokens of a GQA-4 group) made a 512-token chunk
# at 16K+ context cost ~1 ms per layer on the H100.
MOSTLY_DECODE_MAX_QUERY_LEN = 64
# A split of a mixed batch covers at least this many KV tiles: shorter ones cost more in partial results
# than they save.
MIN_SPLIT_TILES = 4
# Decode-only batches of a few requests (the tail of an offline run) split down to one KV tile: at 1-8
# requests x 512-2048 context the attention of a layer took 3-6 us less than with 4-tile splits on the
# H100 (attention_bench.py --small-decode-sweep), and from 16 requests on the split count is the same.
DECODE_MIN_SPLIT_TILES = 1
# Mixed batches whose longest context reaches this split every context over MIXED_SPLITS programs
# (rows with short contexts use one split), unless the partial results would exceed
# MAX_SPLIT_ROWS token rows x splits (a large prefill step fills the GPU without splitting).
MIXED_SPLIT_MIN_SEQ_LEN = 8192
MIXED_SPLITS = 8
MAX_SPLIT_ROWS = 8192


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton interpreter on CPU tensors: any small number exercises the split path
    return _cuda_num_sms(device.index if device.index is not None else torch.cuda.current_device())


_SM_COUNTS: dict[int, int] = {}


def _cuda_num_sms(index: int) -> int:
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def choose_num_splits(num_reqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                      tile_n: int, min_split_tiles: int) -> int:
    """Flash-decoding split count: enough programs for ~2 waves, each split >= min_split_tiles KV tiles."""
    programs = max(1, num_reqs * num_kv_heads)
    if programs >= num_sms:
        return 1
    wanted = triton.cdiv(2 * num_sms, programs)
    return max(1, min(wanted, max_seq_len // (min_split_tiles * tile_n), MAX_SPLITS))


def choose_mixed_splits(num_tokens: int, max_seq_len: int, tile_n: int,
                        min_seq_len: int = MIXED_SPLIT_MIN_SEQ_LEN) -> int:
    """Split count for a batch with prompt chunks: MIXED_SPLITS once a context reaches min_seq_len."""
    if max_seq_len < min_seq_len or num_tokens * MIXED_SPLITS > MAX_SPLIT_ROWS:
        return 1
    return max(1, min(MIXED_SPLITS, max_seq_len // (MIN_SPLIT_TILES * tile_n)))


class TritonPagedBackend:
    """AttentionBackend for CUDA; launch-only (no host-device sync), so CUDA-graph capturable.

    Under graph capture, the choices made from host ints (decode-only or mixed, split count)
    are frozen at capture: capture decode graphs with max_query_len == 1 and a representative
    max_seq_len; any split count stays correct for any sequence lengths.
    """
    name = "triton_paged"

    def __init__(self, decode_config: KernelConfig = DECODE_CONFIG,
                 mixed_config: KernelConfig = MIXED_CONFIG,
                 mostly_decode_config: KernelConfig | None = MOSTLY_DECODE_CONFIG,
                 enable_split_kv: bool = True,
                 mixed_split_min_seq_len: int = MIXED_SPLIT_MIN_SEQ_LEN, separate_short_rows: bool = True) -> None:
        """``mixed_split_min_seq_len``: mixed batches split KV from this max_seq_len on (the model runner
        captures its long-context graphs from it too)."""
        self.decode_config = decode_config
        self.mixed_config = mixed_config
        self.mostly_decode_config = mostly_decode_config
        self.enable_split_kv = enable_split_kv
        self.mixed_split_min_seq_len = mixed_split_min_seq_len
        self.separate_short_rows = separate_short_rows

    def plan(self, metadata: AttentionMetadata, num_tokens: int, num_heads: int,
             num_kv_heads: int) -> "LaunchPlan":
        """The step's launches, decided once for every layer (AttentionBackend.plan)."""
        return LaunchPlan.build(self, num_tokens, num_heads // num_kv_heads, num_kv_heads, metadata,
                                metadata.seq_lens.device)

    def write_kv(self, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, kv_scales: torch.Tensor | None = None) -> None:
        _check_kv_cache(kv_cache)
        scales = kv_scales_of(kv_cache, kv_scales)
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        for name, t in (("key", key), ("value", value)):
            if t.dim() != 3 or tuple(t.shape[1:]) != (num_kv_heads, head_dim):
                raise ValueError(f"{name} must be [num_tokens, {num_kv_heads}, {head_dim}], got {tuple(t.shape)}")
            if t.shape[0] < slot_mapping.shape[0]:
                raise ValueError(f"{name} has {t.shape[0]} tokens, slot_mapping {slot_mapping.shape[0]}")
        key, value = _last_dim_contiguous(key), _last_dim_contiguous(value)
        num_tokens = slot_mapping.shape[0]
        if num_tokens == 0:
            return
        write_kv_kernel[(num_tokens,)](
            key, value, kv_cache, slot_mapping, scales if scales is not None else slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            BLOCK_SIZE=kv_cache.shape[2], KV_FP8=scales is not None)

    def forward(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float, out: torch.Tensor | None = None, sliding_window: int | None = None,
                logits_soft_cap: float | None = None, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
        """As AttentionBackend.forward; ``out`` (same shape as query) may be given, e.g. a static
        buffer under CUDA graphs. Rows of tokens past ``query_start_loc[num_reqs]`` are left as is."""
        _check_kv_cache(kv_cache)
        scales = kv_scales_of(kv_cache, kv_scales)
        num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
        if query.dim() != 3 or query.shape[2] != head_dim:
            raise ValueError(f"query must be [num_tokens, num_heads, {head_dim}], got {tuple(query.shape)}")
        if query.shape[1] % num_kv_heads:
            raise ValueError(f"query num_heads {query.shape[1]} is not a multiple of num_kv_heads {num_kv_heads}")
        query = _last_dim_contiguous(query)
        if out is None:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        elif out.shape != query.shape or out.stride(-1) != 1:
            raise ValueError(f"out must be {tuple(query.shape)} with a contiguous last dim, got {tuple(out.shape)}")
        if metadata.num_reqs == 0 or query.shape[0] == 0:
            return out
        plan = metadata.plan
        if plan is None:  # a caller outside the model runner (kernel tests, benchmarks): plan this call
            plan = self.plan(metadata, query.shape[0], query.shape[1], num_kv_heads)
        options = (NO_OPTIONS if sliding_window is None and logits_soft_cap is None and scales is None
                   else AttentionOptions(sliding_window, logits_soft_cap, scales))
        plan.run(query, kv_cache, metadata, scale, out, options)
        return out


@dataclass(frozen=True, slots=True)
class AttentionOptions:
    """A layer's own attention options (kernel constexpr switches when set)."""
    sliding_window: int | None = None
    logits_soft_cap: float | None = None
    kv_scales: torch.Tensor | None = None  # [k_scale, v_scale] of an fp8 KV cache

    def kernel_args(self, scale: float) -> tuple[float, int, float, bool, bool]:
        """(scale, sliding_window, soft_cap) runtime args, then the SLIDING and SOFT_CAP constexprs."""
        soft_cap = self.logits_soft_cap is not None
        return (scale if soft_cap else scale * LOG2E, self.sliding_window or 0, float(self.logits_soft_cap or 0.0),
                self.sliding_window is not None, soft_cap)


NO_OPTIONS = AttentionOptions()


# Row classes of a launch: every request, or only those with short / long queries (see LaunchPlan).
ALL_ROWS, SHORT_ROWS, LONG_ROWS = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Launch:
    """One launch of the attention kernel (and of the merge kernel when it splits KV)."""
    config: KernelConfig  # fitted to the GQA group (_fit)
    group: int
    decode_only: bool
    num_splits: int
    row_class: int = ALL_ROWS
    short_query_len: int = 0  # SHORT_ROWS: requests with at most this many query tokens; LONG_ROWS: more
    min_split_tiles: int = MIN_SPLIT_TILES

    @property
    def block_q(self) -> int:
        """Tokens per program: the row tile holds BLOCK_Q tokens x GROUP query heads."""
        return self.config.block_m // self.group

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
            scale: float, out: torch.Tensor, options: "AttentionOptions" = NO_OPTIONS) -> None:
        num_tokens, num_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        split = self.num_splits > 1
        if split:
            part_out = torch.empty((self.num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32,
                                   device=query.device)
            part_lse = torch.empty((self.num_splits, num_tokens, num_heads), dtype=torch.float32,
                                   device=query.device)
        else:  # unused by the kernel; any tensor gives valid pointers and strides
            part_out, part_lse = out, out[:, :, 0]
        if self.decode_only:
            num_q_tiles = metadata.num_reqs
        else:
            num_q_tiles = num_tokens // self.block_q + metadata.num_reqs
        head_dim_pad = triton.next_power_of_2(max(head_dim, 16))
        cfg = self.config
        rows = dict(ROW_CLASS=self.row_class, SHORT_QUERY_LEN=self.short_query_len, BLOCK_Q=self.block_q,
                    TILE_N=cfg.tile_n, MIN_SPLIT_TILES=self.min_split_tiles, DECODE_ONLY=self.decode_only)
        scale_arg, window, soft_cap, sliding_on, soft_cap_on = options.kernel_args(scale)
        kv_fp8 = options.kv_scales is not None
        kv_scales = options.kv_scales if kv_fp8 else part_lse  # unread without KV_FP8: any valid pointer
        paged_attention_kernel[(num_q_tiles, num_kv_heads, self.num_splits)](
            out, query, kv_cache, metadata.block_table, metadata.seq_lens, metadata.query_start_loc,
            part_out, part_lse, kv_scales, scale_arg, metadata.num_reqs, self.num_splits, window, soft_cap,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            metadata.block_table.stride(0),
            part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
            GROUP=self.group, BLOCK_M=cfg.block_m, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            BLOCK_SIZE=kv_cache.shape[2], SPLIT=split,
            DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, SOFT_CAP=soft_cap_on,
            SLIDING=sliding_on, KV_FP8=kv_fp8, **rows)
        if split:
            merge_rows = metadata.num_reqs if self.decode_only else num_tokens
            merge_splits_kernel[(merge_rows, num_heads)](
                out, part_out, part_lse, metadata.query_start_loc, metadata.seq_lens, metadata.num_reqs,
                self.num_splits, window,
                out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_out.stride(2),
                part_lse.stride(0), part_lse.stride(1),
                HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=MAX_SPLITS, SLIDING=sliding_on,
                **rows)


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything about one forward's launches that is decided on the host from shapes and host ints.

    Batches with real prefill chunks run two launches: decodes (and other requests whose query
    fits one small row tile) with the decode config, which reads their K/V at full bandwidth, and
    the chunks with the large row tile, split over KV when a context is long. One launch for both
    gave the decodes a 64-row tile with 4 useful rows, and made the chunk's few long programs
    wait behind them."""
    launches: tuple[_Launch, ...]

    @property
    def main(self) -> _Launch:
        """The launch that does the heaviest rows (the only one for most batches)."""
        return self.launches[-1]

    @property
    def config(self) -> KernelConfig:
        return self.main.config

    @property
    def decode_only(self) -> bool:
        return self.main.decode_only

    @property
    def num_splits(self) -> int:
        return self.main.num_splits

    @staticmethod
    def build(backend: TritonPagedBackend, num_tokens: int, group: int, num_kv_heads: int,
              metadata: AttentionMetadata, device: torch.device) -> "LaunchPlan":
        """``num_tokens``: query rows of the forward, padding included; ``group``: query heads per KV head."""
        decode_only = metadata.max_query_len <= 1
        if decode_only:
            config = _fit(backend.decode_config, group)
            num_splits = 1
            if backend.enable_split_kv:
                num_splits = choose_num_splits(metadata.num_reqs, num_kv_heads, metadata.max_seq_len,
                                               _num_sms(device), config.tile_n, DECODE_MIN_SPLIT_TILES)
            return LaunchPlan((_Launch(config, group, True, num_splits,
                                        min_split_tiles=DECODE_MIN_SPLIT_TILES),))
        if (backend.mostly_decode_config is not None
                and num_tokens <= MOSTLY_DECODE_TOKENS_PER_REQ * metadata.num_reqs
                and metadata.max_query_len <= MOSTLY_DECODE_MAX_QUERY_LEN):
            config = _fit(backend.mostly_decode_config, group)
            return LaunchPlan((_Launch(config, group, False, 1),))
        config = _fit(backend.mixed_config, group)
        num_splits = 1
        if backend.enable_split_kv:
            num_splits = choose_mixed_splits(num_tokens, metadata.max_seq_len, config.tile_n,
                                             backend.mixed_split_min_seq_len)
        if not backend.separate_short_rows:
            return LaunchPlan((_Launch(config, group, False, num_splits),))
        short_config = _fit(backend.decode_config, group)
        short_len = short_config.block_m // group  # queries that fit one program of the decode tile
        return LaunchPlan((_Launch(short_config, group, False, 1, SHORT_ROWS, short_len),
                            _Launch(config, group, False, num_splits, LONG_ROWS, short_len)))

    def run(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
            scale: float, out: torch.Tensor, options: "AttentionOptions" = NO_OPTIONS) -> None:
        for launch in self.launches:
            launch.run(query, kv_cache, metadata, scale, out, options)


def _fit(config: KernelConfig, group: int) -> KernelConfig:
    """The config with a row tile of at least one whole GQA group and 16 rows (tl.dot's minimum)."""
    block_m = max(config.block_m, triton.next_power_of_2(group), 16)
    return KernelConfig(block_m, config.tile_n, config.num_warps, config.num_stages)


def _check_kv_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got {tuple(kv_cache.shape)}")
    if kv_cache.stride(4) != 1:
        raise ValueError("kv_cache head_dim must be contiguous (stride 1)")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
