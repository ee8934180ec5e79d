"""ModelRunner: SchedulerOutput -> tensors -> forward -> sample -> ModelRunnerOutput.

It makes no scheduling decisions: it mirrors the scheduler's diffs into its request table
(``requests``: per request id, one RequestState with the InputBatch row that holds its token ids
and block table, its sampling state, and the features that change how a step runs for it) and
the persistent InputBatch, gathers one flat batch (prefill chunks and decodes alike) with
vectorised numpy, uploads it into the persistent device StepBuffers (two pinned non-blocking
copies, block-table diffs applied on the device), runs the model once -- a captured CUDA graph
when the step fits one (decode steps up to max_num_seqs requests, steps with prompt chunks up to
1024 tokens), eagerly otherwise, with the attention launch plan built once for the step -- and
samples for the requests whose known tokens are now all computed. The only host-device
synchronisation of a step is reading the sampled token ids.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from sluice.attention import AttentionMetadata, get_attention_backend
from sluice.attention.kv_quant import FP8_KV_DTYPE, check_fp8_kv_device, resolve_kv_cache_dtype
from sluice.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from sluice.core.interface import LogprobsLists, ModelRunnerOutput, NewRequestData, SchedulerOutput
from sluice.distributed.communication import tp_broadcast
from sluice.distributed.parallel_state import get_tp_rank_and_size
from sluice.distributed.support import per_rank_heads
from sluice.sample.logprobs import compute_prompt_logprobs
from sluice.sample.metadata import PendingOutputs, RequestSamplingState, SamplingMetadata
from sluice.sample.sampler import Sampler, SamplerOutput
from sluice.structured_output.manager import DeferredGrammar, GrammarBitmask, resolve_grammar
from sluice.worker.cuda_graphs import DecodeGraphs, MixedGraphs, capture_sizes, mixed_capture_sizes
from sluice.worker.input_batch import InputBatch, StepInputs, segment_offsets
from sluice.worker.kv_cache import KVCacheSpec, allocate_kv_caches, available_gpu_kv_bytes, num_blocks_for_memory
from sluice.worker.step_buffers import PendingSampledIds, SampledIdsReadback, StepBuffers

if TYPE_CHECKING:
    from sluice.core.kv_offload import PreemptionCosts
    from sluice.lora.manager import LoRAManager
    from sluice.pooling.pooler import PooledStep
    from sluice.spec_decode.config import SpeculativeConfig
    from sluice.spec_decode.proposer import Proposer
    from sluice.worker.kv_swap import KVSwapper

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestState:
    """One running request as the runner knows it, from admission until it finishes or is preempted."""
    row: int  # its InputBatch row: token ids, positions, block table row
    sampling: RequestSamplingState
    prompt_logprobs: int | None  # top logprobs per prompt position it asked for
    per_step_sampling: bool  # penalties, bad words, min_tokens: its sampling metadata changes every step
    reads_output_on_host: bool  # bad words: sampling reads its last output ids on the host

    @classmethod
    def create(cls, row: int, new: NewRequestData, device: torch.device) -> "RequestState":
        params = new.sampling_params
        sampling = RequestSamplingState.create(params, new.prompt_token_ids, list(new.output_token_ids),
                                               new.eos_token_id, device=device)
        return cls(row, sampling, params.prompt_logprobs, params.uses_per_step_state,
                   params.reads_output_text_on_host)


@dataclass(slots=True)
class LaunchedStep:
    """A step queued on the device whose samples ``ModelRunner.collect`` has not read yet."""
    req_ids: list[str]
    sampling_req_ids: list[str]
    states: list[RequestSamplingState]  # of sampling_req_ids, as they were at launch
    sampler_output: SamplerOutput | None
    host_ids: PendingSampledIds | None
    prompt_logprobs: dict[str, LogprobsLists]
    pooled: "PooledStep | None" = None  # pooling engines: the vectors of requests whose prompt completed
    # Speculative decoding: output tokens [num_sampling, k + 1] (-1 past each row's last), the proposals each
    # row verified, and the logprobs of those that asked (one position per verification row, cut to the
    # output tokens in collect).
    spec_out: torch.Tensor | None = None
    num_spec: np.ndarray | None = None
    spec_logprobs: dict[str, LogprobsLists] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, model_config: ModelConfig, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enforce_eager: bool = False,
                 lora_config: LoRAConfig | None = None, kv_cache_dtype: str = "auto",
                 calculate_kv_scales: bool = False, speculative: "SpeculativeConfig | None" = None) -> None:
        """``kv_cache_dtype``: --kv-cache-dtype (auto: the model's dtype; fp8: attention/kv_quant.py);
        ``speculative``: --speculative-config (the proposer hook: sluice/spec_decode/proposer.py)."""
        self.model_config = model_config
        self.lora_config = lora_config
        self.lora_manager: LoRAManager | None = None  # set by load_model with LoRA on
        self.device = torch.device(model_config.device)
        self.dtype = getattr(torch, model_config.dtype)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.attn_backend = get_attention_backend(self.device.type)
        if self.device.type == "cpu":
            from sluice.worker.cpu_malloc import tune_cpu_malloc
            tune_cpu_malloc()
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        # Windowed and global layers mixed (Gemma 2/3): one block table per layer group, and one KV tensor serves
        # one layer of each group (core/hybrid_kv_manager.py); None for every other model.
        self.kv_layer_groups = model_config.kv_layer_groups
        num_kv_groups = len(self.kv_layer_groups) if self.kv_layer_groups is not None else 1
        self.input_batch = InputBatch(max_num_seqs, model_config.max_model_len, block_size, num_kv_groups)
        max_blocks_per_req = -(-model_config.max_model_len // block_size)
        self.step_buffers = StepBuffers(max_num_seqs, max_num_batched_tokens, max_blocks_per_req, self.device,
                                        num_kv_groups)
        # CUDA graphs (decode, and steps with prompt chunks), captured once the KV cache exists; None on CPU or
        # with enforce_eager.
        self.enforce_eager = enforce_eager
        self.decode_graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.long_context_mixed_graphs: MixedGraphs | None = None  # mixed steps with a context that splits KV
        self.requests: dict[str, RequestState] = {}
        # How many requests of the table use each feature, so a step without any skips the lookups.
        self._num_prompt_logprobs = self._num_per_step_sampling = self._num_reading_host_output = 0
        self._num_logprobs = 0  # speculating engines: verified rows' logprobs
        # Sampling metadata is reused while the same requests sample and none of them uses a
        # feature that changes per step (penalties, bad words, min_tokens).
        self._cached_sampling: tuple[list[str], SamplingMetadata] | None = None
        self.sampler = Sampler()
        # The last launched step's sampled ids (device) and, per InputBatch row, the index of its sample.
        self._last_sampled: tuple[torch.Tensor, np.ndarray] | None = None
        self._sampled_host = SampledIdsReadback(max_num_seqs, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        if self.kv_dtype == FP8_KV_DTYPE and self.device.type == "cuda":
            check_fp8_kv_device(self.device)
        # --calculate-kv-scales: the first step with tokens sets every layer's scales (_forward_calculating_kv_scales)
        self._calculate_kv_scales = calculate_kv_scales and self.kv_dtype == FP8_KV_DTYPE
        # With tensor parallelism this rank holds its share of the heads (sluice/distributed/).
        self.tp_rank, self.tp_size = get_tp_rank_and_size()
        self._num_heads, self._num_kv_heads = per_rank_heads(model_config.num_attention_heads,
                                                             model_config.num_kv_heads, self.tp_size)
        num_kv_layers = (len(self.kv_layer_groups[0].layers) if self.kv_layer_groups is not None
                         else model_config.num_layers)  # a block holds one layer group's KV
        self.kv_spec = KVCacheSpec(num_kv_layers, self._num_kv_heads,
                                   model_config.head_dim, block_size, self.kv_dtype)
        # Pooling engines (embeddings) pool hidden states where others sample: see sluice/pooling/pooler.py.
        self.pooler: Pooler | None = None
        # Host KV blocks and the copies to and from them (--swap-space, --kv-offload-space): worker/kv_swap.py.
        self.kv_swapper: KVSwapper | None = None
        if model_config.pooler_config is not None:
            from sluice.pooling.pooler import Pooler
            self.pooler = Pooler(model_config.pooler_config, max_num_seqs, self.device)
        # Speculative decoding's proposer (sluice/spec_decode/proposer.py); None: every step samples one token.
        self.proposer: Proposer | None = None
        self.last_device_step = None  # with a proposer: the last step's device inputs (a draft model reruns them)
        if speculative is not None:
            from sluice.spec_decode.proposer import make_proposer
            self.proposer = make_proposer(speculative)

    # ---- setup -------------------------------------------------------------------------
    def load_model(self) -> None:
        from sluice.models.loader import build_model, iterate_safetensors
        if self.pooler is not None:
            from sluice.pooling.pooler import build_pooling_model as build_model

        cfg = self.model_config
        start = time.perf_counter()
        q4_blocks = None  # a GGUF's 4-bit blocks, kept for CPU decode (layers/quantization/cpu_int4.py)
        if cfg.load_format == "dummy":
            weights = None
        elif cfg.is_gguf:
            from sluice.models.gguf_loader import open_gguf
            checkpoint = open_gguf(cfg.model)
            weights, q4_blocks = checkpoint.weights(dtype=self.dtype), checkpoint.q4_blocks()
        else:
            weights = iterate_safetensors(cfg.model)
        quant = {} if self.pooler is not None else {"quantization": cfg.quantization, "q4_blocks": q4_blocks}
        self.model = build_model(cfg.hf_config, self.dtype, self.device, self.attn_backend,
                                 weights=weights, load_format=cfg.load_format, seed=cfg.seed, **quant)
        self.model.eval()
        self._log_kv_scales(getattr(self.model, "checkpoint_kv_scales", {}))
        if self.lora_config is not None:  # wraps the linear layers' methods: LoRA hooks in only when asked for
            from sluice.lora.manager import LoRAManager
            self.lora_manager = LoRAManager(self.model, self.lora_config, self.dtype, self.device,
                                            max_num_tokens=self.step_buffers.max_num_tokens)
        if self.proposer is not None:  # a draft model loads its weights
            self.proposer.load(self)
        self.load_seconds = time.perf_counter() - start

    def _log_kv_scales(self, checkpoint_scales: dict[int, tuple[float, float]]) -> None:
        """Says where an fp8 KV cache's scales come from (once, at load)."""
        if self.kv_dtype != FP8_KV_DTYPE:
            if checkpoint_scales:
                logger.info("the checkpoint's KV cache scales are unused: the KV cache is %s (--kv-cache-dtype auto)",
                            self.kv_spec.dtype)
            return
        if self._calculate_kv_scales:
            logger.info("fp8 KV cache: scales will be calculated from the first step's K and V (amax / 448)")
        elif len(checkpoint_scales) < self.model_config.num_layers:
            logger.warning("fp8 KV cache: the checkpoint has K/V scales for %d of %d layers; the others use 1.0, "
                           "which may cost accuracy (--calculate-kv-scales derives them from the first step)",
                           len(checkpoint_scales), self.model_config.num_layers)
        else:
            logger.info("fp8 KV cache: K/V scales from the checkpoint for all %d layers", len(checkpoint_scales))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def determine_num_kv_blocks(self, cache: CacheConfig) -> int:
        """``cache.num_blocks`` if given, else as many blocks as its memory budget holds."""
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type == "cuda":
            self._profile_peak_step()
            available = available_gpu_kv_bytes(self.device, cache.gpu_memory_utilization)
        else:
            available = cache.kv_cache_memory_bytes
        if self.proposer is not None and self.proposer.kv_bytes_per_block:
            # A draft model keeps its KV under the same block ids: a block costs both models' bytes.
            target = self.kv_spec.bytes_per_block
            available = available * target // (target + self.proposer.kv_bytes_per_block)
        num_blocks = num_blocks_for_memory(self.kv_spec, available)
        if num_blocks == 0:
            raise ValueError("no memory left for the KV cache: lower max_num_batched_tokens or raise "
                             "gpu_memory_utilization / kv_cache_memory")
        return num_blocks

    @torch.inference_mode()
    def _profile_peak_step(self) -> None:
        """Runs the largest step the scheduler can make to measure peak activation memory (and so
        compiles the kernels of large steps), and compiles the fused sampler's variants.

        The step is max_num_batched_tokens tokens in as few requests as max_model_len allows, each
        computing its prompt from position 0 into its own blocks."""
        max_len = self.model_config.max_model_len
        num_tokens = min(self.max_num_batched_tokens, self.max_num_seqs * max_len)
        query_lens = [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])
        blocks_per_req = -(-max(query_lens) // self.block_size)
        kv = allocate_kv_caches(self.kv_spec, blocks_per_req * len(query_lens), self.device)
        self._bind(kv)
        torch.cuda.reset_peak_memory_stats(self.device)
        metadata = self._prefill_metadata(query_lens, blocks_per_req)
        positions = torch.cat([torch.arange(n, device=self.device) for n in query_lens])
        hidden = self.model(torch.zeros(num_tokens, dtype=torch.long, device=self.device), positions, metadata)
        logits = None
        if self.pooler is None:  # a pooling model has no LM head and never samples
            logits = self.model.compute_logits(hidden[-self.max_num_seqs:])
            self.sampler.compile_variants(logits)
        torch.cuda.synchronize(self.device)
        self._bind([])
        del kv, hidden, logits
        torch.cuda.empty_cache()

    def _prefill_metadata(self, query_lens: list[int], blocks_per_req: int) -> AttentionMetadata:
        """Requests that compute query_lens[i] tokens from position 0, request i in blocks
        i * blocks_per_req onwards."""
        starts = list(itertools.accumulate(query_lens, initial=0))
        num_reqs, device = len(query_lens), self.device
        block_table = torch.arange(num_reqs * blocks_per_req, dtype=torch.int32, device=device).view(num_reqs, -1)
        slots = torch.cat([row * blocks_per_req * self.block_size + torch.arange(n, device=device)
                           for row, n in enumerate(query_lens)])
        metadata = AttentionMetadata(
            num_actual_tokens=starts[-1], num_reqs=num_reqs,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
            block_table=block_table, slot_mapping=slots, max_query_len=max(query_lens),
            max_seq_len=max(query_lens), query_start_loc_cpu=starts, seq_lens_cpu=list(query_lens))
        if self.kv_layer_groups is not None:  # every group in the same blocks: the profile's step writes them once
            metadata.kv_groups = (metadata,) * (len(self.kv_layer_groups) - 1)
        return self._plan(metadata, starts[-1])

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = allocate_kv_caches(self.kv_spec, num_blocks, self.device)
        self._bind(self.kv_caches)
        if self.proposer is not None:
            self.proposer.initialize_kv_cache(num_blocks, self)
        if self.device.type == "cuda" and not self.enforce_eager:
            self.capture_cuda_graphs()

    def initialize_host_kv_cache(self, num_host_blocks: int) -> None:
        """Allocates the host KV blocks (after the device KV cache) for swap space and the host prefix tier."""
        from sluice.worker.kv_swap import KVSwapper
        self.kv_swapper = KVSwapper(self.kv_spec, num_host_blocks, self.kv_caches, self.device)

    def measure_preemption_costs(self) -> "PreemptionCosts":
        from sluice.worker.kv_swap import measure_preemption_costs
        return measure_preemption_costs(self.kv_spec, self.num_parameters, self._num_heads, self.device, self.dtype)

    def capture_cuda_graphs(self) -> None:
        """Captures the decode and mixed-step graphs (after the KV cache is bound: they read its address);
        with LoRA on, with the LoRA kernels in them."""
        with self.lora_manager.capturing() if self.lora_manager is not None else contextlib.nullcontext():
            self._capture_cuda_graphs()

    def _capture_cuda_graphs(self) -> None:
        max_len = self.model_config.max_model_len
        graphs = DecodeGraphs(self.model, self.step_buffers, capture_sizes(self.max_num_seqs), max_seq_len=max_len)
        pool = graphs.capture()
        self.decode_graphs = graphs
        # A step never holds more than max_num_seqs requests of max_model_len tokens.
        sizes = [s for s in mixed_capture_sizes(self.step_buffers.max_num_tokens) if s <= self.max_num_seqs * max_len]
        if sizes:
            # Mixed steps split KV from the backend's mixed_split_min_seq_len on (a chunk deep into a long
            # prompt): one set of graphs below that length, one at max_model_len when it reaches it.
            short_len = min(max_len, self.attn_backend.mixed_split_min_seq_len - 1)
            mixed = MixedGraphs(self.model, self.step_buffers, sizes, max_seq_len=short_len)
            mixed.capture(pool)
            self.mixed_graphs = mixed
            if max_len > short_len:
                long_context = MixedGraphs(self.model, self.step_buffers, sizes, max_seq_len=max_len,
                                           kind="steps with prefill chunks at long context, tokens")
                long_context.capture(pool)
                self.long_context_mixed_graphs = long_context

    @property
    def graph_capture_seconds(self) -> float:
        """Seconds the CUDA graphs held now took to capture (0 without graphs)."""
        sets = (self.decode_graphs, self.mixed_graphs, self.long_context_mixed_graphs)
        return sum((graphs.capture_seconds for graphs in sets if graphs is not None), 0.0)

    def release_cuda_graphs(self) -> None:
        """Drops the CUDA graphs: every later step runs eagerly."""
        self.decode_graphs = self.mixed_graphs = self.long_context_mixed_graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _bind(self, kv_caches: list[torch.Tensor]) -> None:
        from sluice.layers.attention import bind_kv_cache
        if self.kv_layer_groups is None or not kv_caches:
            bind_kv_cache(self.model, kv_caches)
            return
        # Tensor k serves the k-th layer of every group: a block id belongs to one group at a time.
        num_layers = sum(len(group.layers) for group in self.kv_layer_groups)
        layer_caches: list[torch.Tensor] = [kv_caches[0]] * num_layers
        layer_groups = [0] * num_layers
        for group_index, group in enumerate(self.kv_layer_groups):
            for k, layer in enumerate(group.layers):
                layer_caches[layer], layer_groups[layer] = kv_caches[k], group_index
        bind_kv_cache(self.model, layer_caches, layer_groups)

    # ---- one step ----------------------------------------------------------------------
    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self._remove_request(req_id)
        for new in out.scheduled_new_reqs:
            self._remove_request(new.req_id)  # resumed after preemption
            state = RequestState.create(self.input_batch.add_request(new), new, self.device)
            self.requests[new.req_id] = state
            self._count_features(state, 1)
        requests = self.requests
        for cached in out.scheduled_cached_reqs:
            if cached.new_block_ids:
                self.input_batch.append_blocks(requests[cached.req_id].row, cached.new_block_ids)

    def _remove_request(self, req_id: str) -> None:
        state = self.requests.pop(req_id, None)
        if state is not None:
            self.input_batch.remove_request(state.row)
            self._count_features(state, -1)

    def _count_features(self, state: RequestState, delta: int) -> None:
        self._num_prompt_logprobs += delta * (state.prompt_logprobs is not None)
        self._num_logprobs += delta * (state.sampling.params.logprobs is not None)
        self._num_per_step_sampling += delta * state.per_step_sampling
        self._num_reading_host_output += delta * state.reads_output_on_host

    def _plan(self, metadata: AttentionMetadata, num_tokens: int) -> AttentionMetadata:
        """Attaches the attention backend's launch plan for the step, built once here for every layer."""
        metadata.plan = self.attn_backend.plan(metadata, num_tokens, self._num_heads, self._num_kv_heads)
        for group_metadata in metadata.kv_groups:  # a plan may hold block ids (cpu_sdpa): one per group
            group_metadata.plan = self.attn_backend.plan(group_metadata, num_tokens, self._num_heads,
                                                         self._num_kv_heads)
        return metadata

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        """Uploads the step and runs the model: hidden states [num_tokens (+ padding), hidden]."""
        if self.lora_manager is not None:
            self._prepare_lora(inputs)
        graphs, bucket, padded_reqs, padded_tokens = (self._pick_graph(inputs) if not self._calculate_kv_scales
                                                      else (None, None, None, None))
        step = self.step_buffers.upload(inputs, self.input_batch.pop_block_diffs(), num_padded_reqs=padded_reqs,
                                        num_padded_tokens=padded_tokens, pending=self._pending(inputs))
        if self.proposer is not None:
            self.last_device_step = step  # a draft model runs the same inputs
        if bucket is not None:
            return graphs.run(bucket)
        metadata = self._plan(step.metadata, len(step.input_ids))
        if self._calculate_kv_scales:
            return self._forward_calculating_kv_scales(step.input_ids, step.positions, metadata)
        return self.model(step.input_ids, step.positions, metadata)

    def _forward_calculating_kv_scales(self, input_ids: torch.Tensor, positions: torch.Tensor,
                                       metadata: AttentionMetadata) -> torch.Tensor:
        """--calculate-kv-scales: the first step sets each layer's scales from its own K and V before writing
        them (eagerly: a graph would replay the kernels, not the layers' Python). The scales live in device
        tensors that the captured graphs read, so later steps use them whichever way they run."""
        from sluice.layers.attention import Attention
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in layers:
            layer.calculate_kv_scales = True
        try:
            hidden = self.model(input_ids, positions, metadata)
        finally:
            for layer in layers:
                layer.calculate_kv_scales = False
        self._calculate_kv_scales = False
        scales = torch.stack([layer.kv_scales for layer in layers]).cpu()
        logger.info("fp8 KV cache scales calculated from the first step (%d tokens): k %.3g..%.3g, v %.3g..%.3g",
                    len(input_ids), scales[:, 0].min(), scales[:, 0].max(), scales[:, 1].min(), scales[:, 1].max())
        return hidden

    def _prepare_lora(self, inputs: StepInputs) -> None:
        """Gives each token its request's adapter id (InputBatch's per-row column) and lets the LoRA manager fill
        slots for the step."""
        lora_ids = self.input_batch.lora_int_ids[inputs.rows]
        self.lora_manager.prepare_step(np.repeat(lora_ids, np.diff(inputs.query_start_loc)))

    def _pick_graph(self, inputs: StepInputs) -> tuple[DecodeGraphs | None, int | None, int | None, int | None]:
        """(graph set, bucket, padded requests, padded tokens) for the step; all None to run eagerly."""
        if inputs.max_query_len == 1 and self.decode_graphs is not None:
            bucket = self.decode_graphs.bucket_for(len(inputs.rows))
            if bucket is not None:
                return self.decode_graphs, bucket, bucket, None
        elif inputs.max_query_len > 1 and self.mixed_graphs is not None:
            mixed = self.mixed_graphs
            if inputs.max_seq_len > mixed.max_seq_len:
                mixed = self.long_context_mixed_graphs
            bucket = mixed.bucket_for(len(inputs.input_ids)) if mixed is not None else None
            if bucket is not None:
                return mixed, bucket, mixed.num_reqs_for(bucket), bucket
        return None, None, None, None

    def _pending(self, inputs: StepInputs) -> tuple[np.ndarray, torch.Tensor] | None:
        """For each pending token, the index of its sample in the previous step's sampled ids; and those ids."""
        if not len(inputs.pending_rows):
            return None
        return self._previous_samples(inputs.pending_rows)

    def _previous_samples(self, rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """For each InputBatch row, the index of its sample in the previous step's sampled ids; and those ids."""
        last = self._last_sampled
        if last is None:
            raise RuntimeError("a step needs samples of a previous step that was never launched")
        sampled_ids, row_to_index = last
        sources = row_to_index[rows]
        if (sources < 0).any():
            raise RuntimeError("a pending token has no sample in the previous step")
        return sources, sampled_ids

    def must_collect_first(self, scheduler_output: SchedulerOutput) -> bool:
        """Whether the previous step's samples must reach the host before this step launches: bad
        words match the output's last token ids on the host; a speculating engine's verification
        reads its rows' tokens on the host. (Penalties and min_tokens count the sample still in
        flight on the device: see PendingOutputs.)"""
        if self.proposer is not None and not self._samples_plainly(scheduler_output):
            return True
        if any(new.sampling_params.reads_output_text_on_host for new in scheduler_output.scheduled_new_reqs):
            return True
        if not self._num_reading_host_output:
            return False
        requests = self.requests
        return any(state.reads_output_on_host for r in scheduler_output.num_scheduled_tokens
                   if (state := requests.get(r)) is not None)

    def _samples_plainly(self, scheduler_output: SchedulerOutput) -> bool:
        """In a speculating engine, whether a step takes the plain sampler (and may run asynchronously): it
        verifies no proposals, and its proposer, which keeps up from the forward alone, would make none after
        it (``disable_by_batch_size`` at this many requests)."""
        proposer = self.proposer
        return (not scheduler_output.scheduled_spec_token_ids and proposer.keeps_up_in_forward
                and not proposer.config.allows_proposals(len(scheduler_output.num_scheduled_tokens)))

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput,
                grammar: GrammarBitmask | DeferredGrammar | None = None) -> ModelRunnerOutput:
        """One step, start to end: ``collect(launch(scheduler_output, grammar))``."""
        return self.collect(self.launch(scheduler_output, grammar))

    @torch.inference_mode()
    def launch(self, scheduler_output: SchedulerOutput,
               grammar: GrammarBitmask | DeferredGrammar | None = None) -> LaunchedStep:
        """Queues the step's work on the device and returns without waiting for it.

        ``grammar``: structured outputs' token bitmask for the constrained requests that sample (None: none
        do), applied to their logits before sampling; a DeferredGrammar is resolved once the forward is queued
        (and the sampling metadata built), so the host work it does overlaps the forward.

        The sampled ids are copied to the host asynchronously; ``collect`` waits for them. The
        next step may launch first: its pending tokens read these samples on the device.
        """
        if scheduler_output.kv_transfers is not None:
            self.kv_swapper.run(scheduler_output.kv_transfers)
        self._update_states(scheduler_output)
        if scheduler_output.is_empty():
            return LaunchedStep([], [], [], None, None, {})
        num_scheduled = scheduler_output.num_scheduled_tokens
        requests = self.requests
        rows = np.fromiter((requests[r].row for r in num_scheduled), dtype=np.int64, count=len(num_scheduled))
        spec = scheduler_output.scheduled_spec_token_ids
        num_spec = self._write_proposals(spec, num_scheduled, rows) if spec else None
        inputs = self.input_batch.prepare(num_scheduled, rows, num_spec)
        hidden = self._forward(inputs)
        if self.proposer is not None:
            self.proposer.after_forward(self, inputs, hidden)
        if self.pooler is not None:  # pooled vectors instead of samples
            new_rows = {new.req_id: requests[new.req_id].row for new in scheduler_output.scheduled_new_reqs}
            pooled = self.pooler.pool(scheduler_output, inputs, hidden, new_rows)
            return LaunchedStep(inputs.req_ids, [], [], None, None, {}, pooled)
        result, host_ids = None, None
        states = [requests[r].sampling for r in inputs.sampling_req_ids]
        if inputs.sampling_req_ids and self.proposer is not None and not self._samples_plainly(scheduler_output):
            prompt_logprobs = self._prompt_logprobs(inputs, hidden) if self._num_prompt_logprobs else {}
            return self._launch_speculative(inputs, hidden, states, grammar, spec, prompt_logprobs)
        if inputs.sampling_req_ids:
            num_sampling = len(inputs.sampling_req_ids)
            logits = self.model.compute_logits(hidden[self.step_buffers.logits_indices[:num_sampling]])
            metadata = self._sampling_metadata(inputs, states, logits.shape[-1])
            grammar = resolve_grammar(grammar)  # a deferred one may collect the previous step: after the metadata
            if grammar is not None:
                from sluice.structured_output.apply import apply_grammar_bitmask
                apply_grammar_bitmask(logits, inputs.sampling_req_ids, grammar)
            result = self.sampler.sample(logits, metadata)
            if self.tp_size > 1:  # every rank goes on from rank 0's samples, whatever its own RNG drew
                tp_broadcast(result.sampled_token_ids)
            host_ids = self._sampled_host.copy_async(result.sampled_token_ids)
            row_to_index = np.full(self.max_num_seqs, -1, dtype=np.int64)
            row_to_index[inputs.sampling_rows] = np.arange(num_sampling)
            self._last_sampled = (result.sampled_token_ids, row_to_index)
        prompt_logprobs = self._prompt_logprobs(inputs, hidden) if self._num_prompt_logprobs else {}
        return LaunchedStep(inputs.req_ids, inputs.sampling_req_ids, states, result, host_ids, prompt_logprobs)

    def _write_proposals(self, spec: dict[str, list[int]], num_scheduled: dict[str, int],
                         rows: np.ndarray) -> np.ndarray:
        """Writes the scheduled proposals after their rows' tokens; returns each scheduled request's count."""
        num_spec = np.zeros(len(rows), dtype=np.int64)
        for i, req_id in enumerate(num_scheduled):
            token_ids = spec.get(req_id)
            if token_ids:
                self.input_batch.write_spec_tokens(int(rows[i]), token_ids)
                num_spec[i] = len(token_ids)
        return num_spec

    def _launch_speculative(self, inputs: StepInputs, hidden: torch.Tensor, states: list[RequestSamplingState],
                            grammar: GrammarBitmask | DeferredGrammar | None, spec: dict[str, list[int]],
                            prompt_logprobs: dict[str, LogprobsLists]) -> LaunchedStep:
        """Samples a speculating engine's step: every sampling request is verified, with or without proposals
        (sluice/spec_decode/verify.py)."""
        grammar = resolve_grammar(grammar)
        num_spec = (inputs.num_spec_sampling if inputs.num_spec_sampling is not None
                    else np.zeros(len(inputs.sampling_req_ids), dtype=np.int64))
        out, spec_logprobs = self._verify(inputs, hidden, states, num_spec, spec, grammar,
                                          self.proposer.num_speculative_tokens)
        return LaunchedStep(inputs.req_ids, inputs.sampling_req_ids, states, None, None, prompt_logprobs,
                            spec_out=out, num_spec=num_spec, spec_logprobs=spec_logprobs)

    def _verify(self, inputs: StepInputs, hidden: torch.Tensor, states: list[RequestSamplingState],
                ks: np.ndarray, spec: dict[str, list[int]], grammar: GrammarBitmask | None,
                width: int) -> tuple[torch.Tensor, dict[str, LogprobsLists]]:
        """The step's sampling rows: output tokens [rows, width + 1] and, for those that asked, the logprobs of
        one position per verification row."""
        from sluice.spec_decode.verify import verified_logprobs, verify_proposals
        lengths = ks + 1  # request i's rows: its last known token's position, then one per proposal
        rows = np.repeat(inputs.logits_indices - ks, lengths) + segment_offsets(lengths)
        logits = self.model.compute_logits(hidden[self._to_device(rows)])
        req_ids = inputs.sampling_req_ids
        proposals = [spec.get(r, []) for r in req_ids]
        if grammar is not None:  # row j of a constrained request: its grammar's mask after proposals 0..j-1
            from sluice.structured_output.apply import apply_grammar_bitmask
            apply_grammar_bitmask(logits, req_ids, grammar, proposals)
        out = verify_proposals(logits, states, ks, proposals, width)
        if not self._num_logprobs:
            return out, {}
        return out, {req_ids[i]: lists for i, lists in verified_logprobs(logits, states, ks, out).items()}

    def _to_device(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(self.device, non_blocking=True)

    def _collect_speculative(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Records a verified step's output tokens (1 .. k + 1 per request), then asks for the next proposals."""
        sampled: dict[str, list[int]] = {r: [] for r in step.req_ids}
        tokens = step.spec_out.cpu().numpy()
        requests = self.requests
        proposing_ids, proposing_rows = [], []
        logprobs = {}
        for i, (req_id, sampling) in enumerate(zip(step.sampling_req_ids, step.states)):
            token_ids = tokens[i][tokens[i] >= 0].tolist()
            sampled[req_id] = token_ids
            if req_id in step.spec_logprobs:
                logprobs[req_id] = step.spec_logprobs[req_id].rows(0, len(token_ids))
            state = requests.get(req_id)
            if state is not None and state.sampling is sampling:
                sampling.output_token_ids.extend(token_ids)
                self.input_batch.accept_tokens(state.row, token_ids, int(step.num_spec[i]) + 1 - len(token_ids))
                proposing_ids.append(req_id)
                proposing_rows.append(state.row)
        proposals = self.proposer.propose(self, proposing_ids, np.asarray(proposing_rows, dtype=np.int64))
        return ModelRunnerOutput(req_ids=step.req_ids, sampled_token_ids=sampled, logprobs=logprobs,
                                 prompt_logprobs=step.prompt_logprobs, spec_token_ids=proposals)

    def collect(self, step: LaunchedStep) -> ModelRunnerOutput:
        """Waits for a launched step's samples and records them (the step's one device sync)."""
        if step.spec_out is not None:
            return self._collect_speculative(step)
        sampled: dict[str, list[int]] = {r: [] for r in step.req_ids}
        logprobs = {}
        if step.sampling_req_ids:
            token_ids = step.host_ids.wait()
            rows, kept = [], []
            requests = self.requests
            for i, (req_id, sampling, token_id) in enumerate(zip(step.sampling_req_ids, step.states,
                                                                  token_ids.tolist())):
                sampled[req_id] = [token_id]
                # A request finished or preempted since the launch has left the batch: its sample
                # still goes to the scheduler, but no longer into the runner's state.
                state = requests.get(req_id)
                if state is not None and state.sampling is sampling:
                    sampling.output_token_ids.append(token_id)
                    rows.append(state.row)
                    kept.append(i)
            if rows:
                self.input_batch.append_tokens(np.asarray(rows, dtype=np.int64), token_ids[kept])
            logprobs = step.sampler_output.logprobs_by_request(step.sampling_req_ids)
        return ModelRunnerOutput(req_ids=step.req_ids, sampled_token_ids=sampled, logprobs=logprobs,
                                 prompt_logprobs=step.prompt_logprobs,
                                 pooler_output=step.pooled.to_host() if step.pooled is not None else {})

    def _sampling_metadata(self, inputs: StepInputs, states: list[RequestSamplingState],
                           vocab_size: int) -> SamplingMetadata:
        req_ids = inputs.sampling_req_ids
        cached = self._cached_sampling
        per_step = bool(self._num_per_step_sampling) and any(self.requests[r].per_step_sampling for r in req_ids)
        if cached is not None and cached[0] == req_ids and not per_step:
            return cached[1]
        pending = self._pending_outputs(inputs) if per_step else None
        metadata = SamplingMetadata.build(states, vocab_size, self.device, pending)
        self._cached_sampling = (list(req_ids), metadata)
        return metadata

    def _pending_outputs(self, inputs: StepInputs) -> PendingOutputs | None:
        """Sampling rows whose last output token is the previous step's sample, not on the host yet."""
        if not len(inputs.pending_rows):
            return None
        is_pending = np.isin(inputs.sampling_rows, inputs.pending_rows)
        if not is_pending.any():
            return None
        sources, sampled_ids = self._previous_samples(inputs.sampling_rows[is_pending])
        token_ids = sampled_ids.index_select(0, torch.from_numpy(sources).to(sampled_ids.device, non_blocking=True))
        return PendingOutputs(np.flatnonzero(is_pending).tolist(), token_ids)

    def _prompt_logprobs(self, inputs: StepInputs, hidden: torch.Tensor) -> dict[str, LogprobsLists]:
        """Logprobs of the prompt tokens this step computed, for requests that asked for them.

        Hidden state at position p predicts token p + 1, so a chunk covering positions
        [start, end) yields the logprobs of prompt tokens start + 1 .. min(end, P - 1).
        """
        result: dict[str, LogprobsLists] = {}
        for i, req_id in enumerate(inputs.req_ids):
            num_logprobs = self.requests[req_id].prompt_logprobs
            if num_logprobs is None:
                continue
            row = inputs.rows[i]
            end = int(inputs.seq_lens[i])
            start = end - int(inputs.query_start_loc[i + 1] - inputs.query_start_loc[i])
            stop = min(end, int(self.input_batch.num_prompt_tokens[row]) - 1)
            if stop <= start:
                continue
            flat = int(inputs.query_start_loc[i])
            logits = self.model.compute_logits(hidden[flat:flat + stop - start])
            targets = torch.from_numpy(self.input_batch.token_ids[row, start + 1:stop + 1]).to(self.device)
            result[req_id] = compute_prompt_logprobs(logits, targets, num_logprobs)
        return result


def make_model_runner(config: EngineConfig) -> ModelRunner:
    """The runner of one rank (the only one at tensor_parallel_size 1), before its model is loaded."""
    return ModelRunner(config.model, config.cache.block_size, config.scheduler.max_num_seqs,
                       config.scheduler.max_num_batched_tokens, enforce_eager=config.model.enforce_eager,
                       lora_config=config.lora, kv_cache_dtype=config.cache.cache_dtype,
                       calculate_kv_scales=config.cache.calculate_kv_scales, speculative=config.speculative)
