"""The range of every numeric request field, defined once and used by the request models.

Ranges are OpenAI's where OpenAI has the field, vLLM's / SGLang's for their extensions, and never
wider than the protobuf field the value travels in (int32 token ids and top_k, uint32 counts,
float32 sampling values). Numbers are strict, as OpenAI's are: an integer field takes a JSON
integer only (not `4.0`, `"4"` or `true`), a number field an integer or a finite float.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

INT32_MAX = 2**31 - 1  # int32 and uint32 fields both take [0, 2**31 - 1]
FLOAT32_MAX = 3.4028234663852886e38
MAX_N = 128  # samples per request
MAX_TOP_LOGPROBS = 20  # OpenAI's limit; the model may allow fewer


def _int(ge: int, le: int = INT32_MAX) -> Any:
    return Field(strict=True, ge=ge, le=le)


def _float(**bounds: float) -> Any:
    return Field(strict=True, allow_inf_nan=False, **bounds)


TokenId = Annotated[int, _int(0)]
TopK = Annotated[int, _int(-1)]  # -1 and 0: off
MinTokens = Annotated[int, _int(0)]
MaxTokens = Annotated[int, _int(1)]
CompletionMaxTokens = Annotated[int, _int(0)]  # 0 only with echo: the prompt alone
N = Annotated[int, _int(1, MAX_N)]
BestOf = Annotated[int, _int(1)]
TruncatePromptTokens = Annotated[int, _int(-1)]  # -1: the context length; 0 is refused
TopLogprobs = Annotated[int, _int(0, MAX_TOP_LOGPROBS)]
LogprobStartLen = Annotated[int, _int(-1)]  # -1: none; else below the prompt's length
Priority = Annotated[int, _int(-(2**31))]  # int32; lower values go first (vLLM's convention)
# OpenAI documents int64; the scheduler takes the value modulo 2**64, so uint64 seeds work too.
Seed = Annotated[int, _int(-(2**63), 2**64 - 1)]

Temperature = Annotated[float, _float(ge=0.0, le=2.0)]  # OpenAI's range
NativeTemperature = Annotated[float, _float(ge=0.0, le=FLOAT32_MAX)]  # SGLang sets no upper bound
TopP = Annotated[float, _float(gt=0.0, le=1.0)]
MinP = Annotated[float, _float(ge=0.0, le=1.0)]
Penalty = Annotated[float, _float(ge=-2.0, le=2.0)]  # presence and frequency
RepetitionPenalty = Annotated[float, _float(gt=0.0, le=2.0)]  # vLLM's bound
Bias = Annotated[float, _float(ge=-100.0, le=100.0)]

LOGIT_BIAS_KEY = r"[0-9]{1,10}"  # ASCII digits only: str.isdigit() also takes "²" and "١"
