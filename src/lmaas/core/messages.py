"""Messages between the gateway and worker processes (msgspec, sent over ZeroMQ).

The gateway sends :data:`ToWorker` messages; a worker answers with :data:`FromWorker` messages.
Generated text goes back in bulk: one :class:`StepOutput` per engine step carries the new text of
every running sequence, so the gateway wakes once per step, not once per token.

None of these types speaks a wire protocol (OpenAI, KServe v2): the API handlers translate.
"""

from __future__ import annotations

import msgspec

# ---------------------------------------------------------------- worker start-up


class FileDigest(msgspec.Struct, frozen=True):
    """One artifact of a model version, as its manifest records it (path relative to the dir)."""

    path: str
    size_bytes: int
    sha256: str


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker process needs to load and serve one model version."""

    model_name: str
    model_version: str
    task: str
    format: str
    model_dir: str
    files: list[FileDigest]
    requests_endpoint: str
    """ZeroMQ endpoint the worker connects a PULL socket to (gateway → worker)."""
    results_endpoint: str
    """ZeroMQ endpoint the worker connects a PUSH socket to (worker → gateway)."""
    dtype: str = "auto"
    """``auto`` picks bf16 on CPUs with avx512_bf16/AMX, fp16/bf16 on CUDA, else fp32."""
    device: str = "auto"
    context_length: int | None = None
    max_batch_size: int = 32
    verify_checksums: bool = True
    options: dict[str, str] = msgspec.field(default_factory=dict)
    """Free-form serving options from the manifest (``serving`` section)."""
    cache_dir: str | None = None
    """A directory the worker may write derived artifacts into (an exported or quantised ONNX
    graph); the version directory itself is immutable. None: a per-user temp directory."""


# ---------------------------------------------------------------- requests (gateway → worker)


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


MAX_NUM_BEAMS = 16
"""The widest beam search a request may ask for (``num_beams``)."""


class SamplingParams(msgspec.Struct, frozen=True):
    """Decoding parameters, already validated by the API layer."""

    max_tokens: int | None = None
    """None: up to the end of the context."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    min_p: float = 0.0
    """0 disables min-p."""
    presence_penalty: float = 0.0
    """OpenAI semantics, over output tokens: ``logit -= presence * (count > 0)``."""
    frequency_penalty: float = 0.0
    """OpenAI semantics, over output tokens: ``logit -= frequency * count``."""
    repetition_penalty: float = 1.0
    """HF semantics over prompt + output: positive logits divided, negative multiplied."""
    logit_bias: dict[int, float] | None = None
    """Token id → bias added to its logit before sampling."""
    logprobs: int | None = None
    """None: no logprobs; 0: the sampled token's logprob only; k > 0: also the top k."""
    n: int = 1
    """Number of choices to generate from the prompt (each streamed with its ``index``)."""
    response_format: str | None = None
    """The JSON text of the OpenAI ``response_format`` object (json_object / json_schema), or
    None for free text."""
    num_beams: int | None = None
    """Beam search width, seq2seq models only (1..:data:`MAX_NUM_BEAMS`; 1: no beam search).
    None: the model's default; a seq2seq checkpoint's ``generation_config`` ``num_beams`` when
    the request does not sample (temperature 0)."""
    length_penalty: float | None = None
    """Beam search only, HF semantics: a finished beam's score is its log-probability divided
    by ``length ** length_penalty``. None: the checkpoint's (1.0 unless it sets one)."""


class GenerateRequest(msgspec.Struct, frozen=True, tag="generate"):
    """Generate text. Exactly one of ``messages``, ``prompt`` or ``prompt_token_ids`` is set."""

    request_id: str
    sampling: SamplingParams
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    tenant: str = ""
    """Who asks: the gateway stamps the caller's tenant; engine queues share fairly by it."""
    tenant_weight: float = 1.0
    """The tenant's share weight (its service under contention is proportional to it)."""


class EmbedRequest(msgspec.Struct, frozen=True, tag="embed"):
    """Embed each input: texts or pre-tokenized id lists."""

    request_id: str
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    dimensions: int | None = None
    tenant: str = ""
    """Who asks: the gateway stamps the caller's tenant; engine queues share fairly by it."""
    tenant_weight: float = 1.0
    """The tenant's share weight (its service under contention is proportional to it)."""


class TensorData(msgspec.Struct, frozen=True, array_like=True):
    """One named tensor (Open Inference Protocol v2 datatypes).

    Numeric data is little-endian, row-major in ``data``; ``BYTES`` tensors carry one element per
    entry of ``items`` instead (``data`` empty).
    """

    name: str
    datatype: str
    """``FP32``, ``FP16``, ``BF16``, ``FP64``, ``INT8``-``INT64``, ``UINT8``-``UINT64``, ``BOOL``
    or ``BYTES``."""
    shape: list[int]
    data: bytes = b""
    items: list[bytes] | None = None


class TensorSpec(msgspec.Struct, frozen=True, array_like=True):
    """A model input or output as v2 metadata lists it; ``-1`` marks a dynamic axis."""

    name: str
    datatype: str
    shape: list[int]


class RerankRequest(msgspec.Struct, frozen=True, tag="rerank"):
    """Score each document's relevance to the query (cross-encoder)."""

    request_id: str
    query: str
    documents: list[str]
    tenant: str = ""
    """Who asks: the gateway stamps the caller's tenant; engine queues share fairly by it."""
    tenant_weight: float = 1.0
    """The tenant's share weight (its service under contention is proportional to it)."""


class ClassifyRequest(msgspec.Struct, frozen=True, tag="classify"):
    """Classify each input: texts, encoded images (PNG/JPEG/... bytes) or a pixel tensor."""

    request_id: str
    texts: list[str] | None = None
    images: list[bytes] | None = None
    pixel_values: TensorData | None = None
    tenant: str = ""
    """Who asks: the gateway stamps the caller's tenant; engine queues share fairly by it."""
    tenant_weight: float = 1.0
    """The tenant's share weight (its service under contention is proportional to it)."""


class TranscribeRequest(msgspec.Struct, frozen=True, tag="transcribe"):
    """Transcribe one encoded audio file (wav, mp3, flac, ogg...), or translate its speech into
    English text (``task="translate"``)."""

    request_id: str
    audio: bytes
    language: str | None = None
    """ISO-639-1 code, or None to detect it."""
    prompt: str | None = None
    temperature: float = 0.0
    timestamps: bool = True
    """Also return segments with start and end times."""
    task: str = "transcribe"
    """``transcribe`` (text in the spoken language) or ``translate`` (English text; Whisper's
    own translate task, refused by English-only models)."""
    tenant: str = ""
    """Who asks: the gateway stamps the caller's tenant; engine queues share fairly by it."""
    tenant_weight: float = 1.0
    """The tenant's share weight (its service under contention is proportional to it)."""


class TensorRequest(msgspec.Struct, frozen=True, tag="tensor"):
    """Run the model's graph on named input tensors (the generic v2 path)."""

    request_id: str
    inputs: list[TensorData]
    outputs: list[str] | None = None
    """Output names to return; None: all of them."""
    tenant: str = ""
    """Who asks: the gateway stamps the caller's tenant; engine queues share fairly by it."""
    tenant_weight: float = 1.0
    """The tenant's share weight (its service under contention is proportional to it)."""


InferRequest = EmbedRequest | RerankRequest | ClassifyRequest | TranscribeRequest | TensorRequest
"""Requests with one result each (no token stream); workers batch them dynamically."""


class AbortRequest(msgspec.Struct, frozen=True, tag="abort"):
    request_id: str


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


ToWorker = (
    GenerateRequest
    | EmbedRequest
    | RerankRequest
    | ClassifyRequest
    | TranscribeRequest
    | TensorRequest
    | AbortRequest
    | Shutdown
)


# ---------------------------------------------------------------- results (worker → gateway)


class ModelInfo(msgspec.Struct, frozen=True):
    """What a loaded model tells the gateway about itself."""

    context_length: int
    dtype: str
    device: str
    embedding_dim: int | None = None
    matryoshka_dims: list[int] | None = None
    max_input_tokens: int | None = None
    vocab_size: int | None = None
    labels: list[str] | None = None
    """Class labels in output order (classification tasks)."""
    inputs: list[TensorSpec] | None = None
    """The model's inputs as ``/v2/models/{m}`` lists them (None: the task's defaults)."""
    outputs: list[TensorSpec] | None = None
    max_batch_size: int | None = None


class WorkerReady(msgspec.Struct, frozen=True, tag="ready"):
    pid: int
    info: ModelInfo


class WorkerFailed(msgspec.Struct, frozen=True, tag="failed"):
    """The model could not be loaded; the supervisor decides whether to retry."""

    code: str
    message: str
    retryable: bool = True


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One generated token's logprob and its top alternatives (text, logprob)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = msgspec.field(default_factory=list)


class SeqDelta(msgspec.Struct, frozen=True, array_like=True):
    """The new output of one sequence in one step."""

    request_id: str
    text: str
    num_new_tokens: int
    finish_reason: str | None = None
    """``stop`` or ``length`` on the last delta of a sequence, else None."""
    prompt_tokens: int = 0
    """Set on the first delta of a sequence."""
    index: int = 0
    """Choice index (``n > 1``): each choice of one request streams its own deltas."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per new token when the request asked for logprobs, else None."""


class StepOutput(msgspec.Struct, frozen=True, tag="step"):
    deltas: list[SeqDelta]


class EmbedResult(msgspec.Struct, frozen=True, tag="embedded"):
    request_id: str
    data: bytes
    """float32 little-endian, row-major ``[num_inputs, dim]``."""
    num_inputs: int
    dim: int
    prompt_tokens: int


class ScoreResult(msgspec.Struct, frozen=True, tag="scores"):
    """One relevance score per document, in the request's order."""

    request_id: str
    scores: list[float]
    prompt_tokens: int


class ClassifyResult(msgspec.Struct, frozen=True, tag="classified"):
    request_id: str
    probs: bytes
    """float32 little-endian ``[num_inputs, num_labels]`` class probabilities."""
    num_inputs: int
    num_labels: int
    prompt_tokens: int = 0


class Segment(msgspec.Struct, frozen=True, array_like=True):
    id: int
    start: float
    end: float
    text: str


class TranscriptionResult(msgspec.Struct, frozen=True, tag="transcribed"):
    request_id: str
    text: str
    language: str
    duration_s: float
    """Length of the audio, for metering."""
    segments: list[Segment] = msgspec.field(default_factory=list)


class TensorResult(msgspec.Struct, frozen=True, tag="tensors"):
    request_id: str
    outputs: list[TensorData]


InferResult = EmbedResult | ScoreResult | ClassifyResult | TranscriptionResult | TensorResult


class RequestError(msgspec.Struct, frozen=True, tag="error"):
    """A request failed; ``code`` is an :class:`lmaas.core.errors.LmaasError` code."""

    request_id: str
    code: str
    message: str
    param: str | None = None


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    num_running: int
    num_waiting: int
    stats: dict[str, int] = msgspec.field(default_factory=dict)
    """Engine counters (KV blocks free/total, preemptions, prefix-cache hits...)."""


FromWorker = (
    WorkerReady
    | WorkerFailed
    | StepOutput
    | EmbedResult
    | ScoreResult
    | ClassifyResult
    | TranscriptionResult
    | TensorResult
    | RequestError
    | Heartbeat
)
