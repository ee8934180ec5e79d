"""StructuredOutputManager: compiles requests' grammars off the step loop and fills each step's token bitmask.

The engine core owns it; the scheduler sees only ``Request.structured_output`` (a StructuredOutputRequest):

    EngineCore.add_request  -> manager.attach(request)        compile queued in the thread pool (cached by
                                                              (backend, kind, spec)); the request waits
    Scheduler.schedule      -> request.structured_output.is_ready()   not admitted until its grammar is
                                                              compiled; one that failed finishes "error"
    EngineCore.step         -> manager.step_grammars(...)     the grammars of the step's constrained requests
                               manager.grammar_bitmask(...)   (less any that finished) for the runner
    ModelRunner.launch      -> apply_grammar_bitmask(...)     one bitmask row per constrained request that
                                                              samples, filled on the host; disallowed logits
                                                              set to -inf in one op
    Scheduler._check_stop   -> request.structured_output.advance(token)   the matcher takes each accepted
                                                              token; a finished grammar stops the request

Speculative decoding: ``Scheduler._take_proposals`` keeps a constrained request's proposals only up to the first
its grammar refuses (``valid_proposals``: the matcher walks them and rolls back), and the runner masks the
request's k + 1 verification rows, row j with the mask after proposals 0..j-1 (``GrammarBitmask.fill`` walks
the same way, on the host). ``_check_stop`` then advances the matcher by exactly the tokens the step output:
the kept proposals and the token after them, one by one, up to the one that ends the grammar.

A batch without constrained requests costs one counter check per step. With async scheduling a step with
constrained requests launches its forward before the previous step is collected: the engine core hands the
runner a DeferredGrammar, which the runner resolves once the forward is queued, and resolving it collects the
previous step (its samples advance the matchers) and then names the grammars whose rows are filled. The host's
bookkeeping and the fill run while the device computes the forward, and every mask still comes from a matcher
that has taken every earlier token. On CUDA the bitmask is filled in pinned memory, so its copy to the device
does not wait for the forward either.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sluice.sampling_params import StructuredOutputsParams
from sluice.structured_output.backends import (
    BACKENDS, Grammar, fill_rows, grammar_vocab_size, resolve_backend, spec_of,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from sluice.config import ModelConfig
    from sluice.core.interface import SchedulerOutput
    from sluice.core.request import Request

logger = logging.getLogger(__name__)


# The fill work (in seconds) that earns each of a step's fill threads: the grammar libraries' batch fills cost
# ~0.1 ms (xgrammar) or ~0.03 ms (llguidance) more per step on several threads than on one.
FILL_SECONDS_PER_THREAD = 5e-4


class FillCost:
    """What a bitmask row has cost to fill, lately (a moving average of the plain steps' fills: wall time x
    threads / rows), and so how many threads the next step's fill gets: one per FILL_SECONDS_PER_THREAD of
    expected work, at most ``max_threads``. A row early in a JSON document cost 0.4-1.3 us with xgrammar's batch
    call and 4-15 us with llguidance's fill (benchmarks/results/2026-12-07_CPU_structured_fill_878bb3e.md); one
    deep in a schema over a 128k vocabulary costs many times that."""
    __slots__ = ("max_threads", "seconds_per_row")

    def __init__(self, max_threads: int) -> None:
        self.max_threads = max_threads
        self.seconds_per_row = 0.0  # nothing measured yet: the first fill runs on one thread

    def threads_for(self, num_rows: int) -> int:
        return max(1, min(self.max_threads, int(num_rows * self.seconds_per_row / FILL_SECONDS_PER_THREAD)))

    def record(self, seconds: float, num_rows: int, num_threads: int) -> None:
        self.seconds_per_row += 0.2 * (seconds * num_threads / num_rows - self.seconds_per_row)


class GrammarBitmask:
    """The grammars of one step's constrained requests; the runner asks for the bitmask of those that sample
    (it alone knows which do: a prompt chunk that stops short of the known tokens samples nothing).
    ``vocab_size``: the ids the grammars decide over (the tokenizer's); logits past them are disallowed.
    ``cost``: the engine's FillCost, which sets the threads of the grammar libraries' batch fill (default: one
    thread)."""
    __slots__ = ("grammars", "vocab_size", "cost")

    def __init__(self, grammars: dict[str, Grammar], vocab_size: int, cost: FillCost | None = None) -> None:
        self.grammars = grammars
        self.vocab_size = vocab_size
        self.cost = cost if cost is not None else FillCost(max_threads=1)

    def fill(self, sampling_req_ids: list[str], spec_token_ids: "list[list[int]] | None" = None,
             pin: bool = False) -> "tuple[list[int], torch.Tensor] | None":
        """(the constrained rows, the int32 bitmask [rows, ceil(V / 32)] with those rows filled on the host and
        every other row all-allowed); None when no sampling row is constrained. ``pin``: in pinned memory (for
        an asynchronous copy to a CUDA device).

        Without ``spec_token_ids`` request i has row i, and the rows are filled with one batch call per grammar
        library (backends.fill_rows). With them (speculative decoding's verification) request i has
        ``len(spec_token_ids[i]) + 1`` rows in order, row j its mask after taking its proposals 0..j-1:

            proposals [x y]   row 0: mask now   row 1: mask after x   row 2: mask after x y   (then rollback(2))
        """
        grammars = self.grammars
        lengths = [1] * len(sampling_req_ids) if spec_token_ids is None else [len(s) + 1 for s in spec_token_ids]
        constrained = [i for i, req_id in enumerate(sampling_req_ids) if req_id in grammars]
        if not constrained:
            return None
        import torch
        starts = list(itertools.accumulate(lengths, initial=0))
        bitmask = torch.full((starts[-1], (self.vocab_size + 31) // 32), -1, dtype=torch.int32,
                             pin_memory=pin)  # all allowed (xgrammar's layout: bit j of word w is token 32w + j)
        if spec_token_ids is None:
            num_threads = self.cost.threads_for(len(constrained))
            start = time.perf_counter()
            fill_rows(bitmask, [grammars[sampling_req_ids[i]] for i in constrained], constrained, num_threads)
            self.cost.record(time.perf_counter() - start, len(constrained), num_threads)
            return constrained, bitmask
        for i in constrained:
            _fill_along(grammars[sampling_req_ids[i]], bitmask, starts[i], spec_token_ids[i])
        rows = [row for i in constrained for row in range(starts[i], starts[i + 1])]
        return rows, bitmask


class DeferredGrammar:
    """A step's GrammarBitmask, made when it is first asked for (``resolve``, then the same answer again).

    With async scheduling the engine core launches a constrained step with one of these in place of the bitmask;
    the runner resolves it once the step's forward is queued, and making it collects the previous step (whose
    samples advance the matchers) before naming the grammars to fill. The core resolves it after ``launch`` as
    well, for a step that never asked (its constrained requests sample nothing)."""
    __slots__ = ("_make", "_value")

    def __init__(self, make: "Callable[[], GrammarBitmask | None]") -> None:
        self._make: "Callable[[], GrammarBitmask | None] | None" = make
        self._value: GrammarBitmask | None = None

    def resolve(self) -> GrammarBitmask | None:
        if self._make is not None:
            make, self._make = self._make, None
            self._value = make()
        return self._value


def resolve_grammar(grammar: "GrammarBitmask | DeferredGrammar | None") -> GrammarBitmask | None:
    """The step's bitmask maker, made now if it was deferred."""
    return grammar.resolve() if isinstance(grammar, DeferredGrammar) else grammar


def _fill_along(grammar: Grammar, bitmask: "torch.Tensor", row: int, proposals: "list[int] | tuple") -> None:
    """Fills rows ``row ..`` with the masks before each proposal and after the last, then rolls the matcher
    back. Rows after a proposal the grammar refuses, or after one that terminates it, stay all-allowed: the
    refused proposal's own row masks it, so verification rejects it there and no later row is read; a
    terminating one (eos) ends the request, so the token after it is dropped."""
    num_taken = 0
    for token_id in proposals:
        grammar.fill_bitmask(bitmask, row + num_taken)
        if not grammar.accept_token(token_id):
            break
        num_taken += 1
        if grammar.is_terminated():
            break
    else:
        grammar.fill_bitmask(bitmask, row + num_taken)
    grammar.rollback(num_taken)


class StructuredOutputRequest:
    """One request's grammar state: the compile future until it is done, then its matcher."""
    __slots__ = ("_future", "_manager", "grammar", "error", "_freed")

    def __init__(self, future: Future, manager: "StructuredOutputManager") -> None:
        self._future = future
        self._manager = manager
        self.grammar: Grammar | None = None
        self.error: str | None = None  # why the grammar could not be compiled
        self._freed = False

    def is_ready(self) -> bool:
        """Whether the grammar is compiled and the request may run (False also when it failed: see error)."""
        if self.grammar is not None:
            return True
        if self.error is not None or not self._future.done():
            return False
        try:
            backend, compiled = self._future.result()
            self.grammar = backend.matcher(compiled)
        except Exception as e:  # noqa: BLE001 - a bad grammar fails its own request only
            self.error = str(e) or type(e).__name__
            return False
        return True

    def advance(self, token_id: int) -> bool:
        """Feeds an accepted token to the matcher; True when the request must stop (the grammar ended, or
        the token is outside it, which the mask prevents unless the engine sampled without it)."""
        grammar = self.grammar
        if grammar is None:
            return False
        if not grammar.accept_token(token_id):
            logger.warning("token %d is outside the request's grammar; the request stops", token_id)
            return True
        return grammar.is_terminated()

    def valid_proposals(self, proposals: list[int]) -> list[int]:
        """The leading proposals the grammar accepts from where the request's output stands (speculative
        decoding: the scheduler keeps only these, so the verification masks are filled along valid tokens)."""
        grammar = self.grammar
        return proposals[:grammar.num_valid_tokens(proposals)] if grammar is not None else []

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            self.grammar = None
            self._manager.num_active -= 1


class StructuredOutputManager:
    """Grammar compilation (a thread pool, a cache) and the per-step bitmask of the engine core."""

    def __init__(self, model_config: "ModelConfig", backend: str, max_workers: int | None = None,
                 max_cached: int = 512) -> None:
        self.model_config = model_config
        self.backend = backend
        self.vocab_size = model_config.vocab_size
        # the ids the grammars decide over (the bitmask's width): the tokenizer's, known once it is loaded
        self.grammar_vocab_size = model_config.vocab_size
        self.max_workers = max_workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._executor: ThreadPoolExecutor | None = None
        # The grammar libraries' threads for a large step's bitmask: up to half the cores, at most 8.
        self.fill_cost = FillCost(max(1, min(8, (os.cpu_count() or 2) // 2)))
        # compiled grammars by spec, least recently used first; a request holds its own future, so evicting
        # one never touches a running request
        self._compiled: OrderedDict[tuple[str, str, str, bool], Future] = OrderedDict()
        self.max_cached = max_cached
        self._backends: dict[str, Any] = {}
        self._lock = threading.Lock()  # the backends are built once, by the first compile that needs them
        self._tokenizer: Any = None
        self.num_active = 0  # attached requests not freed yet: 0 makes every per-step hook a no-op

    # ---- compiling ---------------------------------------------------------------------------------

    def attach(self, request: "Request") -> None:
        """Queues the compile of the request's grammar (or reuses the cached one) and attaches its state."""
        params = request.sampling_params.structured_outputs
        request.structured_output = StructuredOutputRequest(self.compile_async(params), self)
        self.num_active += 1

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        kind, spec = spec_of(params)
        key = (params.backend or self.backend, kind, spec, not params.disable_any_whitespace)
        future = self._compiled.get(key)
        if future is not None and future.done() and future.exception() is not None:
            future = None  # an error is not cached: the same spec is checked again
        if future is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="sluice-grammar")
            future = self._executor.submit(self._compile, params, kind, spec)
            self._compiled[key] = future
            while len(self._compiled) > self.max_cached:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return future

    def _compile(self, params: StructuredOutputsParams, kind: str, spec: str) -> tuple[Any, Any]:
        backend = self._backend(resolve_backend(params, self.backend))
        return backend, backend.compile(kind, spec, not params.disable_any_whitespace)

    def _backend(self, name: str) -> Any:
        with self._lock:
            backend = self._backends.get(name)
            if backend is None:
                if self._tokenizer is None:
                    self._tokenizer = self._load_tokenizer()
                    self.grammar_vocab_size = grammar_vocab_size(self._tokenizer, self.vocab_size)
                backend = BACKENDS[name](self._tokenizer, self.grammar_vocab_size)
                self._backends[name] = backend
            return backend

    def _load_tokenizer(self) -> Any:
        if self.model_config.skip_tokenizer_init:
            raise ValueError("structured_outputs needs a tokenizer, but the engine runs with skip_tokenizer_init")
        from sluice.tokenizer import get_tokenizer
        return get_tokenizer(self.model_config.model, self.model_config.tokenizer)

    def wait_for_compiles(self, timeout: float) -> None:
        """Blocks up to ``timeout`` seconds until a compile still running finishes (an idle engine core
        whose only waiting requests wait for their grammars sleeps here instead of spinning)."""
        pending = [f for f in self._compiled.values() if not f.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- each step ----------------------------------------------------------------------------------

    def step_grammars(self, requests: dict[str, "Request"], scheduler_output: "SchedulerOutput") -> dict[str, Grammar]:
        """The grammars of the step's constrained requests, in one walk of the step (empty when there are none).
        With async scheduling a non-empty answer makes the core collect the previous step first, so that each
        matcher has taken its last token before ``grammar_bitmask`` hands them to the runner."""
        if not self.num_active:
            return {}
        grammars: dict[str, Grammar] = {}
        for req_id in scheduler_output.num_scheduled_tokens:
            request = requests.get(req_id)
            if request is not None and request.structured_output is not None \
                    and request.structured_output.grammar is not None:
                grammars[req_id] = request.structured_output.grammar
        return grammars

    def grammar_bitmask(self, requests: dict[str, "Request"], grammars: dict[str, Grammar]) -> GrammarBitmask | None:
        """The step's grammars less those of requests that finished meanwhile (None when none are left): the
        runner fills the bitmask of those that sample."""
        live = {r: g for r, g in grammars.items()
                if (request := requests.get(r)) is not None and not request.is_finished()}
        if not live:
            return None
        return GrammarBitmask(live, self.grammar_vocab_size, self.fill_cost)
