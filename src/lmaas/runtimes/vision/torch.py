"""Image classification with a Hugging Face ``*ForImageClassification`` model on torch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lmaas.core.errors import InternalError, InvalidRequestError, ModelLoadError, error_from_code
from lmaas.core.messages import (
    ClassifyRequest,
    ClassifyResult,
    InferRequest,
    ModelInfo,
    RequestError,
    TensorData,
    TensorSpec,
    WorkerSpec,
)
from lmaas.runtimes.base import Prepared
from lmaas.runtimes.batching import run_batch
from lmaas.runtimes.device import (
    configure_threads,
    dtype_name,
    num_threads_option,
    resolve_device,
    resolve_dtype,
)
from lmaas.runtimes.int8_weights import load_int8, wants_int8
from lmaas.runtimes.vision.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image

_log = logging.getLogger(__name__)
MAX_IMAGES_PER_REQUEST = 256


class TorchImageClassificationRunner:
    """Classifies images with the model's own image processor (``preprocessor_config.json``).

    Implements :class:`lmaas.runtimes.base.BatchRunner`: each image is one row, so the worker's
    dynamic batcher merges images of many requests into one forward pass. A request carries
    either encoded images (decoded with Pillow, converted to RGB, then resized, rescaled and
    normalised by ``AutoImageProcessor``, whose Pillow backend needs no torchvision) or a
    ready ``pixel_values`` FP32 tensor ``[N, 3, H, W]`` of the size the processor produces.
    Results are softmax probabilities in ``id2label`` order, as ``pipeline("image-
    classification")`` computes them.

    Args:
        spec: The worker spec; ``options["max_image_pixels"]`` caps ``width * height`` of a
            decoded image (default :data:`DEFAULT_MAX_IMAGE_PIXELS`).
    """

    def __init__(self, spec: WorkerSpec) -> None:
        self._spec = spec
        self._model: Any = None
        self._processor: Any = None
        self._device = torch.device("cpu")
        self._dtype = torch.float32
        self._pixel_shape: tuple[int, int, int] = (3, 0, 0)
        self._labels: list[str] = []
        self._max_pixels = _max_pixels_option(spec.options)

    def load(self) -> ModelInfo:
        """Load the image processor and the classifier. Raises: ModelLoadError."""
        int8 = wants_int8(self._spec.options, Path(self._spec.model_dir))
        # torch's int8 Linear kernels run on the CPU, on float32 activations.
        self._device = torch.device("cpu") if int8 else resolve_device(self._spec.device)
        self._dtype = (
            torch.float32
            if int8
            else resolve_dtype(self._spec.dtype, self._device, prefer_float32_on_cpu=True)
        )
        configure_threads(num_threads_option(self._spec.options))
        self._model, self._processor = load_image_classifier(self._spec, self._dtype)
        self._model.to(self._device)
        self._model.eval()
        id2label = self._model.config.id2label or {}
        self._labels = [str(id2label[i]) for i in sorted(id2label)]
        self._pixel_shape = self._processed_shape()
        channels, height, width = self._pixel_shape
        _log.info("loaded %s on %s (%s)", self._spec.model_dir, self._device, self._dtype)
        return ModelInfo(
            context_length=0,
            dtype="int8" if int8 else dtype_name(self._dtype),
            device=str(self._device),
            labels=self._labels,
            inputs=[
                TensorSpec("image", "BYTES", [-1]),
                TensorSpec("pixel_values", "FP32", [-1, channels, height, width]),
            ],
            outputs=[
                TensorSpec("probabilities", "FP32", [-1, len(self._labels)]),
                TensorSpec("label", "BYTES", [-1]),
            ],
            max_batch_size=self._spec.max_batch_size,
        )

    def warmup(self) -> None:
        """Classify one blank pixel tensor."""
        run_batch(self, [self._blank_request()], self._spec.max_batch_size)

    def health(self) -> bool:
        return self._model is not None

    def accepts(self) -> tuple[type, ...]:
        return (ClassifyRequest,)

    def classify(self, request: ClassifyRequest) -> ClassifyResult:
        """Classify in-process (tests, benchmarks); the worker batches through the pipeline.

        Raises:
            LmaasError: the request's error.
        """
        (result,) = run_batch(self, [request], self._spec.max_batch_size)
        if isinstance(result, RequestError):
            raise error_from_code(result.code, result.message, result.param)
        if not isinstance(result, ClassifyResult):
            raise InternalError(f"unexpected result {type(result).__name__}")
        return result

    def preprocess(self, request: InferRequest) -> Prepared:
        """Decode and preprocess; one ``[3, H, W]`` row per image. Raises: InvalidRequestError."""
        if not isinstance(request, ClassifyRequest) or request.texts is not None:
            raise InvalidRequestError("this model classifies images, not text", param="input")
        if request.images is not None and request.pixel_values is None:
            rows = self._from_images(request.images)
        elif request.pixel_values is not None and request.images is None:
            rows = self._from_pixels(request.pixel_values)
        else:
            raise InvalidRequestError("give either images or pixel_values", param="input")
        return Prepared(request.request_id, [(1, row) for row in rows])

    @torch.inference_mode()
    def forward(self, payloads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self._model is None:
            raise InternalError("the model is not loaded")
        batch = torch.stack(payloads).to(self._device, self._dtype)
        logits = self._model(pixel_values=batch).logits
        return list(torch.softmax(logits.float(), dim=-1).cpu())

    def postprocess(self, prepared: Prepared) -> ClassifyResult:
        probs = torch.stack(prepared.outputs).contiguous()
        return ClassifyResult(
            request_id=prepared.request_id,
            probs=probs.numpy().astype("<f4", copy=False).tobytes(),
            num_inputs=probs.shape[0],
            num_labels=probs.shape[1],
        )

    # ------------------------------------------------------------------ helpers

    def _from_images(self, images: list[bytes]) -> list[torch.Tensor]:
        _check_count(len(images), "images")
        decoded = [
            decode_image(data, self._max_pixels, f"images[{i}]") for i, data in enumerate(images)
        ]
        pixels = self._processor(images=decoded, return_tensors="pt")["pixel_values"]
        return list(pixels.to(torch.float32))

    def _from_pixels(self, tensor: TensorData) -> list[torch.Tensor]:
        expected = list(self._pixel_shape)
        if tensor.datatype != "FP32":
            raise InvalidRequestError(
                f"pixel_values must be FP32, got {tensor.datatype}", param="pixel_values"
            )
        if len(tensor.shape) != 4 or tensor.shape[1:] != expected:
            raise InvalidRequestError(
                f"pixel_values must have shape [N, {', '.join(map(str, expected))}], "
                f"got {tensor.shape}",
                param="pixel_values",
            )
        _check_count(tensor.shape[0], "pixel_values")
        num_values = tensor.shape[0] * expected[0] * expected[1] * expected[2]
        if len(tensor.data) != 4 * num_values:
            raise InvalidRequestError(
                f"pixel_values holds {len(tensor.data)} bytes; shape {tensor.shape} in FP32 "
                f"needs {4 * num_values}",
                param="pixel_values",
            )
        values = torch.frombuffer(bytearray(tensor.data), dtype=torch.float32)
        if not bool(torch.isfinite(values).all()):
            raise InvalidRequestError("pixel_values must be finite", param="pixel_values")
        return list(values.reshape(tensor.shape))

    def _processed_shape(self) -> tuple[int, int, int]:
        """The ``[C, H, W]`` the processor produces (the same for every input size)."""
        from PIL import Image

        probe = Image.new("RGB", (97, 61))
        pixels = self._processor(images=[probe], return_tensors="pt")["pixel_values"]
        channels, height, width = (int(d) for d in pixels.shape[1:])
        return channels, height, width

    def _blank_request(self) -> ClassifyRequest:
        shape = [1, *self._pixel_shape]
        data = bytes(4 * shape[1] * shape[2] * shape[3])
        return ClassifyRequest(
            request_id="__lmaas_warmup__",
            pixel_values=TensorData("pixel_values", "FP32", shape, data),
        )


def _check_count(count: int, param: str) -> None:
    if count == 0:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if count > MAX_IMAGES_PER_REQUEST:
        raise InvalidRequestError(
            f"at most {MAX_IMAGES_PER_REQUEST} images per request, got {count}", param=param
        )


def _max_pixels_option(options: dict[str, str]) -> int:
    raw = options.get("max_image_pixels")
    if raw is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ModelLoadError(f"serving option max_image_pixels={raw!r} is not a positive integer")
    return value


def load_image_classifier(spec: WorkerSpec, dtype: torch.dtype) -> tuple[Any, Any]:
    """Load ``(model, image processor)`` locally, safetensors only, no remote code unless the
    import recorded ``--trust-remote-code``. Raises: ModelLoadError."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model_dir = Path(spec.model_dir)
    if not (model_dir / "preprocessor_config.json").is_file():
        raise ModelLoadError(f"{model_dir} has no preprocessor_config.json (image processor)")
    trust = spec.options.get("trust_remote_code") == "true"
    try:
        # Untyped in transformers' annotations.
        processor = transformers.AutoImageProcessor.from_pretrained(  # type: ignore[no-untyped-call]
            str(model_dir), local_files_only=True, trust_remote_code=trust
        )
        if wants_int8(spec.options, model_dir):
            return load_int8(model_dir, "AutoModelForImageClassification", trust), processor
        model = transformers.AutoModelForImageClassification.from_pretrained(
            str(model_dir),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust,
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, ImportError, ...
        raise ModelLoadError(f"cannot load {model_dir} as an image classifier: {exc}") from exc
    return model, processor
