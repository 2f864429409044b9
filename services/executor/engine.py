"""The executor's engine: model, KV pool, request table mirror and sampler, driven by Steps.

It never decides what to run: a Step says which rows join or leave, which KV slots each position
uses and which tokens to compute. A Step is validated whole before anything is applied, so a bad
one changes no state.

A Step runs in two halves so the host work of step N+1 can overlap step N's forward: `prepare`
validates it against the rows that all earlier prepared steps leave (`planned`) and builds its
host-side tensors; `execute` applies it and computes, reading only at that point what the previous
step produced (its sampled tokens, for `use_last_sampled` slices). Steps must be executed in the
order they were prepared; `prepare` may run on another thread than `execute`.

A Step of decodes only may run several iterations (`StepInput.decode_steps`, sent under the
scheduler's --num-continuous-decode-steps): iteration 0 runs as any Step, and each later one
computes the same rows one position further from the tokens the one before sampled, exactly as
that many one-iteration Steps would; the output holds one token per row per iteration.
`end_decode` ends such a Step after the iteration in progress (the scheduler's EndDecode, when a
request arrives): the output then holds the iterations run (`StepOutput.decode_iterations`).

Rows with a grammar (`AddRequest.grammar`) sample under its token mask: the grammar is compiled
when the Step is prepared (usually a cache hit: the scheduler compiles it ahead with
CompileGrammar), its matcher is built when the row joins, and a row whose grammar ends is reported
in `StepOutput.grammar_ended`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from services.common.grammar import GrammarError
from services.executor.attention import AttentionBackend, create_backend
from services.executor.batch_builder import BatchPlan, materialize, order_slices, plan_batch
from services.executor.batch_invariant import make_batch_invariant
from services.executor.decode_runner import StaticDecodeConfig, StaticDecodeRunner
from services.executor.direct_decode import DirectDecode
from services.executor.grammar import GrammarRuntime
from services.executor.kv_pool import KVPool, RequestToTokenTable, TableWrites
from services.executor.model_config import ModelConfig
from services.executor.prompt_logprobs import prompt_logprobs
from services.executor.sampler import Sampler, SampleRow
from services.executor.sampling_params import SamplingParams
from services.executor.step import (
    NewRequest,
    PromptLogprobs,
    SampledToken,
    SharedPrefix,
    Slice,
    StepInput,
    StepOutput,
)
from services.executor.validation import (
    StepRejected,
    advance_plan,
    check_decode_rows,
    check_shared_slots,
    validate_step,
)

log = logging.getLogger("radixserve.executor")


class InjectedFault(RuntimeError):
    """Raised on purpose by --fault-injection-request-id (tests only)."""


@dataclass
class RowState:
    request_id: str
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    has_sampled: bool = False
    matcher: Any = None  # xgrammar GrammarMatcher of a constrained row
    jump_forward: bool = False  # emit the grammar's forced tokens after each sampled one
    awaiting_forced: bool = False  # forced tokens emitted, not yet given back as input ids


@dataclass
class PreparedStep:
    """A validated Step with its host-side tensors, valid for the engine `epoch` it was built in."""

    step: StepInput
    epoch: int
    order: list[int]  # slice indices, extends first
    writes: TableWrites | None
    batch: BatchPlan | None
    # Multi-step decode (`StepInput.decode_steps`): iterations 1, 2, ... prepared (all rows).
    iterations: list[PreparedStep] = field(default_factory=list)


@dataclass(frozen=True)
class EngineLimits:
    """What the engine holds: KV slots, request-table rows, positions per request, the most
    top-logprob alternatives a row may ask for, and the KV pool's dtype (`--kv-cache-dtype`;
    None: the model's)."""

    num_slots: int
    max_rows: int
    context_length: int
    max_top_logprobs: int = 20
    kv_dtype: torch.dtype | None = None


class Engine:
    def __init__(
        self,
        model: nn.Module,
        cfg: ModelConfig,
        limits: EngineLimits,
        device: torch.device,
        attention_backend: str = "torch",
        static_decode: StaticDecodeConfig | None = None,
        grammar: GrammarRuntime | None = None,
        deterministic: bool = False,
    ) -> None:
        """`deterministic` (--enable-deterministic-inference): every token's logits and every
        draw depend on its own request alone; raises ValueError where the attention backend
        cannot run that way (no CPU attention kernel) or with a static-shape decode."""
        self.model, self.cfg, self.limits, self.device = model, cfg, limits, device
        self.grammar = grammar  # None: requests with a grammar are rejected
        # Test-only fault injection (--fault-injection-request-id, --fault-injection-stage): a
        # row whose request id contains this string raises InjectedFault when sampled ("sample")
        # or in every forward pass that computes a slice of it ("forward").
        self.fault_request_id: str | None = None
        self.fault_stage = "sample"
        self.dtype = next(model.parameters()).dtype
        self.pool = KVPool(
            cfg.num_layers,
            limits.num_slots,
            cfg.num_kv_heads,
            cfg.head_dim,
            limits.kv_dtype or self.dtype,
            device,
        )
        # One row more than steps may use: row `pad_row` stays all slot 0, so padded entries of a
        # static-shape decode batch read and write only the padding slot.
        self.pad_row = limits.max_rows
        self.table = RequestToTokenTable(limits.max_rows + 1, limits.context_length, device)
        self.attn: AttentionBackend = create_backend(
            attention_backend,
            pool=self.pool,
            table=self.table,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            sliding_window=cfg.sliding_window,
        )
        if deterministic:
            self._make_deterministic(static_decode)
        # Pure-decode batches on the CPU skip the modules' Python (see direct_decode.py).
        self.direct_decode = (
            DirectDecode(model, self.attn)
            if DirectDecode.supports(model, self.attn, device)
            else None
        )
        self.sampler = Sampler(cfg.vocab_size, device, batch_invariant=deterministic)
        self.rows: dict[int, RowState] = {}
        # Rows as the prepared steps leave them (row -> has sampled), guarded by plan_lock. An
        # epoch change (reset, failed step) makes steps prepared before it re-validate on execute.
        self.planned: dict[int, bool] = {}
        self.epoch = 0
        self.plan_lock = threading.Lock()
        self.last_sampled = torch.zeros(limits.max_rows, dtype=torch.int64, device=device)
        # step_id of the multi-iteration Step to end after its current iteration (`end_decode`);
        # written by any thread, read by the forward thread between iterations.
        self._end_decode_of: int | None = None
        self.decode_runner: StaticDecodeRunner | None = None
        if static_decode is not None:
            max_bs = min(static_decode.max_bs, limits.max_rows)
            self.decode_runner = StaticDecodeRunner(
                model, self.attn, self.pad_row, replace(static_decode, max_bs=max_bs), device
            )
            if self.decode_runner.use_cuda_graph:
                self.attn.graph_decode_rows = max_bs

    def _make_deterministic(self, static_decode: StaticDecodeConfig | None) -> None:
        self.attn.make_batch_invariant()
        if static_decode is not None:
            raise ValueError("deterministic inference runs decode eagerly (no static decode)")
        make_batch_invariant(self.model)

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8), prompt_len: int = 64) -> None:
        """Runs prefill and decode shapes once and captures the static decode buckets (CUDA).
        Every position maps to the padding slot 0, so no cached KV is touched; slot 0 is zeroed
        afterwards. Only valid with no active rows."""
        assert not self.rows, "warm-up needs an idle engine"
        n = min(max(batch_sizes), self.limits.max_rows)
        prompt_len = min(prompt_len, self.limits.context_length - 2)
        greedy = SamplingParams(temperature=0.0)
        adds = [NewRequest(r, "warmup", greedy) for r in range(n)]
        self.run_step(
            StepInput(0, add=adds, slices=[Slice(r, 0, [0] * prompt_len) for r in range(n)])
        )
        if self.decode_runner is not None:
            self.decode_runner.capture_all()
        for bs in batch_sizes:
            decode = [Slice(r, prompt_len, [], use_last_sampled=True) for r in range(min(bs, n))]
            self.run_step(StepInput(0, slices=decode))
        with torch.inference_mode():
            self.attn.warmup_shared_prefixes(self.dtype, self.pad_row)
        self.reset()
        self.pool.zero_slot(0)

    def reset(self) -> None:
        with self.plan_lock:
            self.epoch += 1
            self.planned.clear()
        self.rows.clear()
        self.table.reset()
        self.sampler.reset()
        self.last_sampled.zero_()
        self._end_decode_of = None  # another scheduler's step ids may repeat this one's

    def end_decode(self, step_id: int) -> None:
        """Ends the Step `step_id`, if it runs several decode iterations, after the iteration it
        computes now (after its first if it has not started). Safe from any thread; a step_id
        that is not such a Step, or was executed already, changes nothing."""
        self._end_decode_of = step_id

    def run_step(self, step: StepInput) -> StepOutput:
        """Applies and computes one Step; raises StepRejected (state untouched) if invalid."""
        return self.execute(self.prepare(step))

    def prepare(self, step: StepInput, resync: bool = False) -> PreparedStep:
        """Validates `step` after every step prepared so far and builds its host-side parts.
        Raises StepRejected, leaving the plan as it was. With `resync`, the plan first restarts
        from the rows applied so far (in a new epoch), in the same critical section."""
        self._compile_grammars(step)
        with self.plan_lock:
            if resync:
                self.epoch += 1  # steps prepared after the stale one re-validate too
                self.planned = {r: st.has_sampled for r, st in self.rows.items()}
            validate_step(step, self)
            advance_plan(self.planned, step)
            epoch = self.epoch
        order = order_slices(step.slices)
        writes = [(w.row, w.start, w.kv_indices) for w in step.writes if w.kv_indices]
        return PreparedStep(
            step,
            epoch,
            order,
            TableWrites.concat(writes) if writes else None,
            self._plan(step, order) if step.slices else None,
            [
                self._prepared_iteration(step.iteration(i), epoch)
                for i in range(1, step.decode_steps if step.slices else 1)
            ],
        )

    def _prepared_iteration(self, part: StepInput, epoch: int) -> PreparedStep:
        """A later iteration of a multi-step decode (`StepInput.iteration`, non-empty), prepared:
        decodes only, so its slices stay in their order."""
        return PreparedStep(part, epoch, list(range(len(part.slices))), None, self._plan(part))

    def _plan(self, step: StepInput, order: list[int] | None = None) -> BatchPlan:
        """The batch plan of `step`'s slices (non-empty) in `order` (default: as they are)."""
        slices = step.slices if order is None else [step.slices[i] for i in order]
        return plan_batch(slices, self._spans(step))

    def _compile_grammars(self, step: StepInput) -> None:
        for req in step.add:
            if req.grammar is None or req.compiled is not None:
                continue
            if self.grammar is None:
                raise StepRejected(f"request {req.request_id!r}: this executor has no grammars")
            try:
                req.compiled = self.grammar.compile(req.grammar)
            except GrammarError as exc:
                raise StepRejected(f"request {req.request_id!r}: invalid grammar: {exc}") from None

    def _spans(self, step: StepInput) -> list[SharedPrefix]:
        """The Step's shared spans the attention backend attends once per group."""
        return self.attn.select_shared_prefixes(step.shared_prefixes, step.slices)

    def execute(self, prepared: PreparedStep) -> StepOutput:
        """Applies and computes a prepared Step, the next one in prepare order."""
        prepared = self._revalidated(prepared)
        started = time.perf_counter_ns()
        try:
            self._apply_membership(prepared)
            out = StepOutput(prepared.step.step_id)
            if prepared.batch is not None:
                out.tokens, out.grammar_ended, out.failed = self._compute(
                    prepared, out.unwritten, out.prompt_logprobs
                )
                out.num_tokens = sum(s.length for s in prepared.step.slices)
                if prepared.iterations:
                    self._decode_on(prepared, out)
        except Exception:
            with self.plan_lock:
                self.epoch += 1  # the plan may be ahead of what was applied
            raise
        out.forward_ns = time.perf_counter_ns() - started
        return out

    def _revalidated(self, prepared: PreparedStep) -> PreparedStep:
        """`prepared`, or the same Step prepared again when an epoch change made it stale."""
        if prepared.epoch == self.epoch:
            return prepared
        return self.prepare(prepared.step, resync=True)

    def _apply_membership(self, prepared: PreparedStep) -> None:
        """Applies releases, adds and table writes; raises StepRejected, applying nothing, when
        a shared span's slots differ (they name slots written by earlier Steps, which preparing
        ahead cannot see yet, so they are checked here)."""
        step = prepared.step
        check_shared_slots(step, self)
        check_decode_rows(step, self)
        matchers = [self._matcher(req) for req in step.add]
        for row in step.release_rows:
            rid = self.rows.pop(row).request_id
            log.debug("released row %d", row, extra={"request_id": rid})
            self.sampler.release_row(row)
        if step.release_rows:
            self.table.clear_rows(step.release_rows)
        for req, matcher in zip(step.add, matchers, strict=True):
            state = RowState(req.request_id, req.sampling, req.prompt_ids, list(req.output_ids))
            state.matcher = matcher
            state.jump_forward = req.jump_forward and matcher is not None
            self.rows[req.row] = state
            self.sampler.add_row(req.row, req.sampling, req.prompt_ids, state.output_ids)
            log.debug("added at row %d", req.row, extra={"request_id": req.request_id})
        if prepared.writes is not None:
            self.table.write_many(prepared.writes)

    def _decode_on(self, prepared: PreparedStep, out: StepOutput) -> None:
        """Iterations 1, 2, ... of a multi-step decode whose iteration 0 is in `out`: each
        computes every row one position further from the token the iteration before sampled,
        and appends one token per slice to `out.tokens` (slice order). A row that failed (its
        forward or its sampling) leaves the later iterations: it gets placeholder tokens, listed
        in `out.failed`, and every other row carries on. Iterations run on the same rows, in
        the same order, as that many one-step Steps would: the same tokens, seeds included."""
        step = prepared.step
        rows = [s.row for s in step.slices]
        failed_rows = {out.tokens[i].row: cause for i, cause in out.failed.items()}
        out.decode_iterations = 1 + len(prepared.iterations)
        for i, sub in enumerate(prepared.iterations, start=1):
            if self._end_decode_of == step.step_id:
                out.decode_iterations = i
                log.debug("step %d ended after %d decode iterations", step.step_id, i)
                break
            if failed_rows:
                part = step.iteration(i, set(rows) - set(failed_rows))
                sub = self._prepared_iteration(part, prepared.epoch) if part.slices else None
            tokens: dict[int, SampledToken] = {}
            failed_now: dict[int, str] = {}
            if sub is not None:
                unwritten: dict[int, str] = {}
                got, _, failed = self._compute(sub, unwritten, [])
                tokens = {t.row: t for t in got}
                out.unwritten.update(unwritten)
                out.num_tokens += len(sub.step.slices)
                failed_now = {got[j].row: cause for j, cause in failed.items()}
            for row in rows:
                if row in tokens and row not in failed_now:
                    out.tokens.append(tokens[row])
                    continue
                cause = failed_now.get(row) or failed_rows[row]
                out.failed[len(out.tokens)] = cause
                out.tokens.append(SampledToken(row, 0))
            failed_rows.update(failed_now)

    def _matcher(self, req: NewRequest) -> Any:
        """The grammar matcher of a joining row (None when free), past its output so far."""
        if req.compiled is None:
            return None
        assert self.grammar is not None
        try:
            return self.grammar.matcher(req.compiled, req.output_ids)
        except GrammarError as exc:
            raise StepRejected(f"request {req.request_id!r}: {exc}") from None

    def logits(self, step: StepInput) -> torch.Tensor:
        """Applies `step` and returns the raw logits [num_sampled, vocab] in step order, unsampled."""
        prepared = self._revalidated(self.prepare(step))
        self._apply_membership(prepared)
        logits = self.run_forward(prepared.batch)
        sampled_order = [i for i in prepared.order if step.slices[i].sample]
        back = sorted(range(len(sampled_order)), key=lambda j: sampled_order[j])
        return logits[back]

    @torch.inference_mode()
    def run_forward(self, plan: BatchPlan | None) -> torch.Tensor:
        """The logits [num_sampled + prompt positions, vocab] of a prepared batch whose Step has
        been applied (the sampled rows first, then those of `plan.prompt`)."""
        assert plan is not None, "a step without slices has no forward"
        batch = materialize(plan, self.table, self.last_sampled, self.device)
        runner = self.decode_runner
        if runner is not None and batch.shared is None and runner.can_run(batch):
            return runner.run(batch)
        self.attn.init_metadata(batch)
        direct = self.direct_decode
        if direct is not None and direct.can_run(batch):
            return direct.run(batch)
        return self.model(batch, self.attn)

    @torch.inference_mode()
    def _compute(
        self, prepared: PreparedStep, unwritten: dict[int, str], prompt: list[PromptLogprobs]
    ) -> tuple[list[SampledToken], list[int], dict[int, str]]:
        """The sampled tokens in the Step's slice order, the indices among them of the rows whose
        grammar ended, and of those whose forward or sampling failed (with the cause). Rows whose
        slice's forward failed go into `unwritten` too; the prompt logprobs of the others go into
        `prompt`, in the Step's slice order."""
        step = prepared.step
        logits = self._forward_contained(step, prepared.order, prepared.batch, unwritten, prompt)
        slice_of_row = {s.row: i for i, s in enumerate(step.slices)}
        prompt.sort(key=lambda p: slice_of_row[p.row])
        sampled = [step.slices[i] for i in prepared.order if step.slices[i].sample]
        if not sampled:
            return [], [], {}
        tokens: dict[int, SampledToken] = {}
        failed: dict[int, str] = {}  # row -> cause
        live = []  # indices into `sampled` that really sample
        for i, s in enumerate(sampled):
            st = self.rows[s.row]
            if s.row in unwritten:
                failed[s.row] = unwritten[s.row]
                tokens[s.row] = SampledToken(s.row, 0)
            elif st.awaiting_forced and s.use_last_sampled:
                # Computes the token before the forced ones; what follows it is known already.
                tokens[s.row] = SampledToken(s.row, st.output_ids[-1])
            else:
                st.awaiting_forced = False
                live.append(i)
        # The logits rows are those of the slices that were computed; keep the live ones.
        computed = [i for i, s in enumerate(sampled) if s.row not in unwritten]
        if live != computed:
            row_of = {i: k for k, i in enumerate(computed)}
            logits = logits[[row_of[i] for i in live]]
        sampled = [sampled[i] for i in live]
        ended_rows = self._sample_contained(logits, sampled, tokens, failed) if sampled else set()
        out = [tokens[s.row] for s in step.slices if s.sample]
        ended = [i for i, t in enumerate(out) if t.row in ended_rows]
        return out, ended, {i: failed[t.row] for i, t in enumerate(out) if t.row in failed}

    def _forward_contained(
        self,
        step: StepInput,
        order: list[int],
        plan: BatchPlan | None,
        unwritten: dict[int, str],
        prompt: list[PromptLogprobs],
    ) -> torch.Tensor:
        """Logits [sampled slices computed, V] of the slices `order` (indices into step.slices,
        extends first), in that order; the prompt logprobs of those slices go into `prompt`. When
        the forward raises, each half of the slices is computed on its own, down to single
        slices: a slice that fails alone goes into `unwritten` (row -> cause) and has no logits
        row; every other slice is computed as usual. A forward writes only the KV of its own
        slices' positions, and computing them again writes the same values, so trying again is
        safe."""
        try:
            self._inject_fault("forward", [step.slices[i].row for i in order])
            return self._split_prompt(self.run_forward(plan), plan, prompt)
        except Exception as exc:
            if len(order) == 1:
                row = step.slices[order[0]].row
                log.warning("forward failed for %s", self.rows[row].request_id, exc_info=exc)
                unwritten[row] = f"{type(exc).__name__}: {exc}"
                return torch.empty(0, self.cfg.vocab_size)
            log.warning("forward of %d slices failed (%s); computing halves apart", len(order), exc)
        half = len(order) // 2
        parts = []
        for part in (order[:half], order[half:]):
            sub = plan_batch([step.slices[i] for i in part])
            logits = self._forward_contained(step, part, sub, unwritten, prompt)
            if logits.shape[0]:
                parts.append(logits)
        return torch.cat(parts) if parts else torch.empty(0, self.cfg.vocab_size)

    def _split_prompt(
        self, logits: torch.Tensor, plan: BatchPlan | None, prompt: list[PromptLogprobs]
    ) -> torch.Tensor:
        """The sampled rows of a forward's `logits`; the prompt-logprob rows after them become
        the prompt logprobs of their slices, appended to `prompt`."""
        if plan is None or plan.prompt is None:
            return logits
        num_sampled = logits.shape[0] - int(plan.prompt.token_idx.shape[0])
        top_counts = [self.rows[row].params.top_logprobs for row in plan.prompt.rows]
        prompt += prompt_logprobs(logits[num_sampled:], plan.prompt, top_counts)
        return logits[:num_sampled]

    def _inject_fault(self, stage: str, rows: list[int]) -> None:
        fault = self.fault_request_id
        if not fault or self.fault_stage != stage:
            return
        if any(fault in self.rows[row].request_id for row in rows):
            raise InjectedFault(f"fault injected for request id containing {fault!r}")

    def _sample_contained(
        self,
        logits: torch.Tensor,
        sampled: list[Slice],
        tokens: dict[int, SampledToken],
        failed: dict[int, str],
    ) -> set[int]:
        """Samples one token per slice into `tokens`; returns the rows whose grammar ended. When
        choosing the tokens raises, each row is tried alone: a row that fails again gets a
        placeholder token and its cause in `failed`, and every other row is sampled as usual.
        Choosing changes no row state, so trying again is safe."""
        try:
            chosen = self._choose(logits.clone() if len(sampled) > 1 else logits, sampled)
        except Exception as exc:
            if len(sampled) > 1:
                ended: set[int] = set()
                for i, s in enumerate(sampled):
                    ended |= self._sample_contained(logits[i : i + 1], [s], tokens, failed)
                return ended
            row = sampled[0].row
            rid = self.rows[row].request_id
            log.warning("sampling failed", exc_info=exc, extra={"request_id": rid})
            failed[row] = f"{type(exc).__name__}: {exc}"
            tokens[row] = SampledToken(row, 0)
            return set()
        return self._commit(chosen, sampled, tokens)

    def _choose(self, logits: torch.Tensor, sampled: list[Slice]) -> tuple[Any, list[int]]:
        """The sampler's output for `sampled` (logits [len(sampled), V], modified in place) and
        the indices of its constrained rows. Changes no row state."""
        states = [self.rows[s.row] for s in sampled]
        self._inject_fault("sample", [s.row for s in sampled])
        constrained = [i for i, st in enumerate(states) if st.matcher is not None]
        if constrained:
            assert self.grammar is not None
            self.grammar.mask(logits, constrained, [states[i].matcher for i in constrained])
        result = self.sampler(
            logits,
            [
                SampleRow(st.params, st.prompt_ids, st.output_ids, row=s.row)
                for s, st in zip(sampled, states, strict=True)
            ],
        )
        return result, constrained

    def _commit(
        self, chosen: tuple[Any, list[int]], sampled: list[Slice], tokens: dict[int, SampledToken]
    ) -> set[int]:
        """Applies the chosen tokens to the rows (outputs, grammars, jump-forward) into `tokens`;
        returns the rows whose grammar ended."""
        result, constrained = chosen
        states = [self.rows[s.row] for s in sampled]
        matchers = [states[i].matcher for i in constrained]
        rows_t = torch.tensor([s.row for s in sampled], device=self.device)
        self.last_sampled[rows_t] = result.token_ids
        token_ids = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        ended_rows = set()
        if constrained:
            ended = GrammarRuntime.advance(matchers, [token_ids[i] for i in constrained])
            ended_rows = {sampled[i].row for i, e in zip(constrained, ended, strict=True) if e}
        for i, (s, st) in enumerate(zip(sampled, states, strict=True)):
            st.output_ids.append(token_ids[i])
            st.has_sampled = True
            token = SampledToken(
                s.row, token_ids[i], logprobs[i], result.top_ids[i], result.top_logprobs[i]
            )
            if st.jump_forward and s.row not in ended_rows:
                token.forced = GrammarRuntime.jump_forward(st.matcher)
                if token.forced:
                    st.output_ids.extend(token.forced)
                    st.awaiting_forced = True
            tokens[s.row] = token
        return ended_rows
