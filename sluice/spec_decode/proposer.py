"""Proposers: the runner's one hook for speculative decoding, chosen from ``--speculative-config``.

After each step the runner asks its proposer for the tokens that should follow each speculating request's
(now known) tokens; they travel to the scheduler in ``ModelRunnerOutput.spec_token_ids`` and come back, as
many as the budget and the request's limits allow, in the next step's ``scheduled_spec_token_ids``.

    ngram        prompt lookup over the request's tokens on the host (ngram.py)
    draft_model  a smaller model of the same vocabulary (draft_model.py): it runs every step's tokens too,
                 with its own KV cache under the target's block ids, then k one-token steps from each
                 sampled token (argmax)
    eagle        a one-layer EAGLE head over the target's hidden states (eagle.py), the same KV scheme
    eagle3       a one-layer EAGLE-3 head over three of the target's layers, guessing in a draft
                 vocabulary (eagle3.py), EAGLE's scheme
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from sluice.spec_decode.config import SpeculativeConfig
from sluice.spec_decode.ngram import NgramProposer

if TYPE_CHECKING:
    from sluice.worker.input_batch import StepInputs
    from sluice.worker.model_runner import ModelRunner


class Proposer(Protocol):
    num_speculative_tokens: int
    kv_bytes_per_block: int  # KV bytes it keeps per block of the target's pool (0: none)
    # Its state keeps up with the target from ``after_forward`` alone (or it has none), so a step after which
    # it would propose nothing (disable_by_batch_size) may sample plainly, asynchronously, without ``propose``.
    keeps_up_in_forward: bool

    def load(self, runner: "ModelRunner") -> None:
        """Called once the target model is loaded (a draft model loads its weights)."""

    def initialize_kv_cache(self, num_blocks: int, runner: "ModelRunner") -> None:
        """Called once the target's KV cache is allocated (a draft model allocates its own)."""

    def after_forward(self, runner: "ModelRunner", inputs: "StepInputs", hidden: torch.Tensor) -> None:
        """Called once the target's forward of a step is queued with its hidden states (a draft model runs the
        same tokens; EAGLE keeps the hidden states for after verification)."""

    def propose(self, runner: "ModelRunner", req_ids: list[str], rows: np.ndarray) -> dict[str, list[int]]:
        """Proposals for the requests (InputBatch rows) whose tokens the last step extended."""


def make_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method == "ngram":
        return NgramLookup(config)
    if config.method == "eagle":
        from sluice.spec_decode.eagle import EagleProposer
        return EagleProposer(config)
    if config.method == "eagle3":
        from sluice.spec_decode.eagle3 import Eagle3Proposer
        return Eagle3Proposer(config)
    from sluice.spec_decode.draft_model import DraftModelProposer
    return DraftModelProposer(config)


class NgramLookup:
    """Prompt lookup on each row's tokens in InputBatch (no device work)."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens
        self.lookup = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self.kv_bytes_per_block = 0
        self.keeps_up_in_forward = True  # no state: it reads the tokens when it proposes

    def load(self, runner: "ModelRunner") -> None:
        return None

    def initialize_kv_cache(self, num_blocks: int, runner: "ModelRunner") -> None:
        return None

    def after_forward(self, runner: "ModelRunner", inputs: "StepInputs", hidden: torch.Tensor) -> None:
        return None

    def propose(self, runner: "ModelRunner", req_ids: list[str], rows: np.ndarray) -> dict[str, list[int]]:
        if not req_ids or not self.config.allows_proposals(len(runner.requests)):
            return {}
        batch = runner.input_batch
        proposals = {}
        for req_id, row in zip(req_ids, rows.tolist()):
            tokens = self.lookup.propose(batch.token_ids[row, :batch.num_tokens[row]])
            if len(tokens):
                proposals[req_id] = tokens.tolist()
        return proposals
