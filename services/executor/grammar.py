"""Grammar-constrained sampling in the executor: compiled grammars, one matcher per row, masks.

Each constrained row holds an xgrammar `GrammarMatcher` over its grammar. Before a step samples,
the matchers of its constrained rows fill one batched token bitmask (xgrammar's packed int32
format, one bit per vocabulary id) and xgrammar's `apply_token_bitmask_inplace` sets the logits of
disallowed tokens to -inf (on the CPU, `kernels/cpu/token_mask.cpp` does the same, faster); the
model's stop tokens are allowed only where the grammar accepts the
text so far. After sampling, each matcher accepts its row's token; a row whose grammar is then
complete (it accepted a stop token) or rejects the token has ended.

Jump-forward: where the grammar allows exactly one continuation (the `"key": "` between two JSON
values), a row that asks for it also gets those tokens after its sampled one, at no forward
pass; the scheduler feeds them back as the input of the row's next slice.

A matcher is rebuilt from a request's output ids when it joins (a retracted request coming back
replays them), so a row's state never depends on which steps it sat out.

Compilation needs the model's vocabulary: the tokenizer is loaded on first use, and compiled
grammars are cached by `GrammarSpec` (`CACHE_SIZE` most recent), on top of xgrammar's own cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kernels.cpu.token_mask import apply_token_bitmask_, load_token_mask_kernel
from services.common.grammar import GrammarError, GrammarSpec, compile_grammar

log = logging.getLogger("radixserve.executor")
CACHE_SIZE = 256
MAX_JUMP_FORWARD = 32  # most forced tokens emitted after one sampled token


def hf_tokenizer_info(model_path: Path, vocab_size: int, stop_ids: Sequence[int]) -> Any:
    """xgrammar TokenizerInfo of the Hugging Face tokenizer saved in `model_path`, padded to the
    model's `vocab_size` (ids past the tokenizer's are never allowed), stopping on `stop_ids`."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return xgr.TokenizerInfo.from_huggingface(
        tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
    )


class GrammarRuntime:
    """Compiles grammars for one model and masks / advances the rows that use them.

    `tokenizer_info` builds the xgrammar TokenizerInfo (called once, on first compile). `compile`
    is thread-safe (the forward thread and the CompileGrammar RPC's pool both call it); `mask`
    and `advance` run on the forward thread only.
    """

    def __init__(
        self,
        tokenizer_info: Callable[[], Any],
        vocab_size: int,
        max_rows: int,
        device: torch.device,
        threads: int = 1,
    ) -> None:
        self._make_info = tokenizer_info
        self.vocab_size, self.device, self.threads = vocab_size, device, threads
        self._compiler: Any = None
        self._compiler_error: str | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._bitmask: torch.Tensor | None = None
        self._max_rows = max_rows
        self._batch: Any = None

    # ---- compiling (any thread) ----------------------------------------------------------------

    def compile(self, spec: GrammarSpec) -> Any:
        """The CompiledGrammar of `spec`; raises GrammarError with the reason if invalid."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = compile_grammar(self._get_compiler(), spec)  # unlocked: may take a while
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def preload(self) -> bool:
        """Loads the tokenizer and creates the compiler now rather than at the first grammar
        (a few seconds), and on the CPU builds the token-mask kernel (once per machine). False
        when grammars are not available (the reason is logged)."""
        if self.device.type == "cpu":
            load_token_mask_kernel()
        try:
            self._get_compiler()
        except GrammarError:
            return False
        return True

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None and self._compiler_error is None:
                self._compiler, self._compiler_error = self._new_compiler()
            if self._compiler_error is not None:
                raise GrammarError(self._compiler_error)
            return self._compiler

    def _new_compiler(self) -> tuple[Any, str | None]:
        import xgrammar as xgr

        try:
            info = self._make_info()
        except Exception as exc:
            log.exception("cannot load the tokenizer for grammars")
            return None, f"grammars are not available: the tokenizer did not load ({exc})"
        log.info("grammar compiler ready: vocabulary of %d ids", info.vocab_size)
        return xgr.GrammarCompiler(info, max_threads=max(self.threads, 1)), None

    # ---- per row (forward thread) ---------------------------------------------------------------

    def matcher(self, compiled: Any, output_ids: Sequence[int]) -> Any:
        """A new matcher over `compiled`, advanced over the tokens a request already generated.
        Raises GrammarError if they do not follow the grammar."""
        import xgrammar as xgr

        m = xgr.GrammarMatcher(compiled)
        for i, token in enumerate(output_ids):
            if m.is_terminated() or not m.accept_token(token):
                raise GrammarError(f"output token {i} ({token}) does not follow the grammar")
        return m

    def mask(self, logits: torch.Tensor, rows: list[int], matchers: list[Any]) -> None:
        """Sets to -inf the logits ([S, V] float32, in place) of the tokens each matcher does not
        allow next, for logits rows `rows`; matchers already terminated are skipped."""
        live = [(r, m) for r, m in zip(rows, matchers, strict=True) if not m.is_terminated()]
        if not live:
            return
        bitmask = self._bitmask_for(logits.shape[0])
        idx = [r for r, _ in live]
        if len(live) == 1:
            live[0][1].fill_next_token_bitmask(bitmask, idx[0])
        else:
            self._batch_matcher().batch_fill_next_token_bitmask([m for _, m in live], bitmask, idx)
        apply_token_bitmask_(logits, bitmask, idx, self.vocab_size)

    @staticmethod
    def advance(matchers: list[Any], token_ids: list[int]) -> list[bool]:
        """Feeds each matcher its row's sampled token; True where the row's grammar has ended
        (a stop token completed it, or the token was not allowed)."""
        ended = []
        for m, token in zip(matchers, token_ids, strict=True):
            if m.is_terminated():
                ended.append(True)
                continue
            ok = m.accept_token(token)
            ended.append(not ok or m.is_terminated())
        return ended

    @staticmethod
    def jump_forward(matcher: Any, limit: int = MAX_JUMP_FORWARD) -> list[int]:
        """The tokens the grammar forces next (at most `limit`), accepted into `matcher`: xgrammar
        greedily matches the longest vocabulary tokens to the forced text, never a stop token,
        and leaves out a last token that a longer one could extend."""
        forced = []
        for token in matcher.find_jump_forward_tokens()[:limit]:
            if not matcher.accept_token(token):
                break
            forced.append(token)
        return forced

    def _bitmask_for(self, rows: int) -> torch.Tensor:
        import xgrammar as xgr

        if self._bitmask is None or self._bitmask.shape[0] < rows:
            size = max(rows, min(self._max_rows, 64))
            self._bitmask = xgr.allocate_token_bitmask(size, self.vocab_size)
        return self._bitmask

    def _batch_matcher(self) -> Any:
        import xgrammar as xgr

        if self._batch is None:
            self._batch = xgr.BatchGrammarMatcher(max_threads=max(self.threads, 1))
        return self._batch
