from radixserve.v1 import grammar_pb2 as _grammar_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndDecodeRequest(_message.Message):
    __slots__ = ("step_id",)
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    def __init__(self, step_id: _Optional[int] = ...) -> None: ...

class EndDecodeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompileGrammarResponse(_message.Message):
    __slots__ = ("duration_ns",)
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    duration_ns: int
    def __init__(self, duration_ns: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_name", "model_path", "architecture", "vocab_size", "context_length", "num_kv_slots", "max_running_requests", "dtype", "device", "attention_backend", "eos_token_ids", "max_top_logprobs", "tp_size", "kv_bytes_per_token", "kv_cache_dtype", "end_decode")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    END_DECODE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_path: str
    architecture: str
    vocab_size: int
    context_length: int
    num_kv_slots: int
    max_running_requests: int
    dtype: str
    device: str
    attention_backend: str
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_top_logprobs: int
    tp_size: int
    kv_bytes_per_token: int
    kv_cache_dtype: str
    end_decode: bool
    def __init__(self, model_name: _Optional[str] = ..., model_path: _Optional[str] = ..., architecture: _Optional[str] = ..., vocab_size: _Optional[int] = ..., context_length: _Optional[int] = ..., num_kv_slots: _Optional[int] = ..., max_running_requests: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., attention_backend: _Optional[str] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., max_top_logprobs: _Optional[int] = ..., tp_size: _Optional[int] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., end_decode: _Optional[bool] = ...) -> None: ...

class WarmupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WarmupResponse(_message.Message):
    __slots__ = ("duration_ns",)
    DURATION_NS_FIELD_NUMBER: _ClassVar[int]
    duration_ns: int
    def __init__(self, duration_ns: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("ready", "active_rows")
    READY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ROWS_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    active_rows: int
    def __init__(self, ready: _Optional[bool] = ..., active_rows: _Optional[int] = ...) -> None: ...

class ResetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "logit_bias", "logprobs", "top_logprobs")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    seed: int
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: bool
    top_logprobs: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ...) -> None: ...

class AddRequest(_message.Message):
    __slots__ = ("row", "request_id", "sampling", "prompt_ids", "output_ids", "grammar", "jump_forward", "traceparent")
    ROW_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    JUMP_FORWARD_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    row: int
    request_id: str
    sampling: SamplingParams
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    output_ids: _containers.RepeatedScalarFieldContainer[int]
    grammar: _grammar_pb2.Grammar
    jump_forward: bool
    traceparent: str
    def __init__(self, row: _Optional[int] = ..., request_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., output_ids: _Optional[_Iterable[int]] = ..., grammar: _Optional[_Union[_grammar_pb2.Grammar, _Mapping]] = ..., jump_forward: _Optional[bool] = ..., traceparent: _Optional[str] = ...) -> None: ...

class SlotWrite(_message.Message):
    __slots__ = ("row", "start", "kv_indices")
    ROW_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    KV_INDICES_FIELD_NUMBER: _ClassVar[int]
    row: int
    start: int
    kv_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, row: _Optional[int] = ..., start: _Optional[int] = ..., kv_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class Slice(_message.Message):
    __slots__ = ("row", "start", "input_ids", "use_last_sampled", "sample", "logprob_start", "next_token_id")
    ROW_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    USE_LAST_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_START_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    row: int
    start: int
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    use_last_sampled: bool
    sample: bool
    logprob_start: int
    next_token_id: int
    def __init__(self, row: _Optional[int] = ..., start: _Optional[int] = ..., input_ids: _Optional[_Iterable[int]] = ..., use_last_sampled: _Optional[bool] = ..., sample: _Optional[bool] = ..., logprob_start: _Optional[int] = ..., next_token_id: _Optional[int] = ...) -> None: ...

class SharedPrefix(_message.Message):
    __slots__ = ("length", "rows")
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    length: int
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, length: _Optional[int] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step_id", "release_rows", "add", "writes", "slices", "shared_prefixes", "decode_steps")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ROWS_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    SHARED_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    release_rows: _containers.RepeatedScalarFieldContainer[int]
    add: _containers.RepeatedCompositeFieldContainer[AddRequest]
    writes: _containers.RepeatedCompositeFieldContainer[SlotWrite]
    slices: _containers.RepeatedCompositeFieldContainer[Slice]
    shared_prefixes: _containers.RepeatedCompositeFieldContainer[SharedPrefix]
    decode_steps: int
    def __init__(self, step_id: _Optional[int] = ..., release_rows: _Optional[_Iterable[int]] = ..., add: _Optional[_Iterable[_Union[AddRequest, _Mapping]]] = ..., writes: _Optional[_Iterable[_Union[SlotWrite, _Mapping]]] = ..., slices: _Optional[_Iterable[_Union[Slice, _Mapping]]] = ..., shared_prefixes: _Optional[_Iterable[_Union[SharedPrefix, _Mapping]]] = ..., decode_steps: _Optional[int] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step_id", "error", "rows", "token_ids", "logprobs", "top_ids", "top_logprobs", "num_tokens", "forward_ns", "grammar_ended", "forced_counts", "forced_ids", "failed", "failed_reasons", "unwritten_rows", "unwritten_reasons", "prompt_rows", "prompt_counts", "prompt_logprobs", "prompt_top_ids", "prompt_top_logprobs", "decode_iterations")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_ENDED_FIELD_NUMBER: _ClassVar[int]
    FORCED_COUNTS_FIELD_NUMBER: _ClassVar[int]
    FORCED_IDS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    FAILED_REASONS_FIELD_NUMBER: _ClassVar[int]
    UNWRITTEN_ROWS_FIELD_NUMBER: _ClassVar[int]
    UNWRITTEN_REASONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ROWS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DECODE_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    error: StepError
    rows: _containers.RepeatedScalarFieldContainer[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    num_tokens: int
    forward_ns: int
    grammar_ended: _containers.RepeatedScalarFieldContainer[int]
    forced_counts: _containers.RepeatedScalarFieldContainer[int]
    forced_ids: _containers.RepeatedScalarFieldContainer[int]
    failed: _containers.RepeatedScalarFieldContainer[int]
    failed_reasons: _containers.RepeatedScalarFieldContainer[str]
    unwritten_rows: _containers.RepeatedScalarFieldContainer[int]
    unwritten_reasons: _containers.RepeatedScalarFieldContainer[str]
    prompt_rows: _containers.RepeatedScalarFieldContainer[int]
    prompt_counts: _containers.RepeatedScalarFieldContainer[int]
    prompt_logprobs: _containers.RepeatedScalarFieldContainer[float]
    prompt_top_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    decode_iterations: int
    def __init__(self, step_id: _Optional[int] = ..., error: _Optional[_Union[StepError, _Mapping]] = ..., rows: _Optional[_Iterable[int]] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., num_tokens: _Optional[int] = ..., forward_ns: _Optional[int] = ..., grammar_ended: _Optional[_Iterable[int]] = ..., forced_counts: _Optional[_Iterable[int]] = ..., forced_ids: _Optional[_Iterable[int]] = ..., failed: _Optional[_Iterable[int]] = ..., failed_reasons: _Optional[_Iterable[str]] = ..., unwritten_rows: _Optional[_Iterable[int]] = ..., unwritten_reasons: _Optional[_Iterable[str]] = ..., prompt_rows: _Optional[_Iterable[int]] = ..., prompt_counts: _Optional[_Iterable[int]] = ..., prompt_logprobs: _Optional[_Iterable[float]] = ..., prompt_top_ids: _Optional[_Iterable[int]] = ..., prompt_top_logprobs: _Optional[_Iterable[float]] = ..., decode_iterations: _Optional[int] = ...) -> None: ...
