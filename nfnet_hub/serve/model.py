"""One bundle as a KServe model: Open Inference Protocol inputs in, logits (and top-k labels) out.

Inputs: ``pixel_values`` FP32 ``[N, C, H, W]`` (preprocessed; C is 3, 1 for a greyscale model ...), or
``image`` BYTES ``[N]`` (encoded JPEG/PNG/WebP/BMP files, as base64 strings in JSON, of up to ``max_image_pixels``
each; preprocessed here with the bundle's timm eval transform, in its image mode; a model that records none takes
``pixel_values`` only).
Outputs: ``logits`` FP32 ``[N, C]``; with the request parameter ``top_k`` (1 to C), also ``labels`` BYTES
``[N, k]`` and ``scores`` FP32 ``[N, k]`` (softmax probabilities, highest first). ``logits`` requested with the output
parameter ``classification`` k (Triton's classification extension: tritonclient's ``class_count``) is answered as
Triton answers it: BYTES ``[N, k]``, ``"VALUE:INDEX:LABEL"`` for the k largest logits.
Every mistake in a request is a ``kserve.errors.InvalidInput``, which KServe answers with
``{"error": ...}`` and HTTP 400.
"""
from __future__ import annotations

import asyncio
import base64
import io
import sys
import uuid
from concurrent.futures import Executor

import numpy as np

from ..errors import UsageError
from ..preprocess import open_image
from ..runtime import OnnxClassifier
from .batching import Batcher
from .metrics import VERSION, observer

_argv, sys.argv = sys.argv, sys.argv[:1]  # kserve parses sys.argv for its own options when first imported
try:
    import kserve.model_server  # noqa: F401
    from kserve import InferOutput, InferRequest, InferResponse, Model
    from kserve.errors import InvalidInput
finally:
    sys.argv = _argv

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")


def _int_parameter(parameters, key: str) -> int | None:
    """An integer request or output parameter (0 where absent), from JSON or gRPC; None if it is not an integer."""
    value = parameters.get(key, 0)
    if hasattr(value, "int64_param"):  # gRPC's InferParameter
        value = value.int64_param if value.WhichOneof("parameter_choice") == "int64_param" else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class BundleModel(Model):
    """A bundle's ONNX model behind the batcher, named as clients address it."""

    def __init__(self, name: str, classifier: OnnxClassifier, *, max_batch_size: int, max_delay_ms: float,
                 instances: int, max_image_pixels: int, decoder: Executor):
        """``decoder``: the threads that decode images, one image each at a time (shared by the models)."""
        super().__init__(name)
        self.classifier, self.max_image_pixels, self.decoder = classifier, max_image_pixels, decoder
        self.channels, (self.height, self.width) = classifier.preprocess.channels, classifier.preprocess.input_size
        self.num_classes = len(classifier.labels)
        self.max_batch_size = max_batch_size
        self.batcher = Batcher(classifier.logits, max_batch_size=max_batch_size, max_delay_s=max_delay_ms / 1000,
                               instances=instances, observe=observer(name))
        self.ready = True

    def get_input_types(self) -> list[dict]:
        """Preprocessed pixels, and encoded images where the model records a mode to read them in."""
        pixels = {"name": "pixel_values", "datatype": "FP32", "shape": [-1, self.channels, self.height, self.width]}
        image = {"name": "image", "datatype": "BYTES", "shape": [-1]}
        return [pixels, image] if self.classifier.preprocess.image_mode else [pixels]

    def get_output_types(self) -> list[dict]:
        return [{"name": "logits", "datatype": "FP32", "shape": [-1, self.num_classes]},
                {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
                {"name": "scores", "datatype": "FP32", "shape": [-1, -1]}]

    async def predict(self, payload: InferRequest, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise InvalidInput("expected an Open Inference Protocol v2 request")
        top_k = self._top_k(payload.parameters or {})
        classify = self._class_counts(payload.request_outputs or [])
        wanted = [o.name for o in payload.request_outputs or []] or (
            ["logits", "labels", "scores"] if top_k else ["logits"])
        unknown = sorted(set(wanted) - {"logits", "labels", "scores"})
        if unknown:
            raise InvalidInput(f"unknown output {', '.join(map(repr, unknown))}: this model answers 'logits', and "
                               "'labels' and 'scores' with the request parameter top_k")
        if not top_k and {"labels", "scores"} & set(wanted):
            raise InvalidInput("outputs 'labels' and 'scores' need the request parameter top_k")
        logits = await self.batcher(await self._pixels(payload))  # _pixels keeps to the batcher's size limit
        outputs = {"logits": logits}
        if top_k:
            order = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
            outputs["scores"] = np.take_along_axis(probs, order, axis=1).astype(np.float32)
            outputs["labels"] = np.array([[self.classifier.labels[i].encode() for i in row] for row in order],
                                         dtype=np.object_)
        if "logits" in classify:
            outputs["logits"] = self._classification(logits, classify["logits"])
        infer_outputs = []
        for name in wanted:
            data = outputs[name]
            out = InferOutput(name, list(data.shape), "BYTES" if data.dtype == np.object_ else "FP32")
            out.set_data_from_numpy(data, binary_data=False)
            infer_outputs.append(out)
        return InferResponse(payload.id or str(uuid.uuid4()), self.name, infer_outputs, model_version=VERSION,
                             use_binary_outputs=payload.use_binary_outputs, requested_outputs=payload.request_outputs)

    def _top_k(self, parameters) -> int:
        top_k = _int_parameter(parameters, "top_k")
        if top_k is None or not 0 <= top_k <= self.num_classes:
            raise InvalidInput(f"parameter top_k must be an integer from 1 to {self.num_classes}, got "
                               f"{parameters.get('top_k')!r}")
        return top_k

    def _class_counts(self, requested) -> dict[str, int]:
        """The outputs requested with Triton's ``classification`` parameter, and its count (0: none), which Triton
        caps at the number of classes."""
        counts = {}
        for output in requested:
            parameters = output.parameters or {}
            if "classification" not in parameters:
                continue
            count = _int_parameter(parameters, "classification")
            if count is None or count < 0:
                raise InvalidInput(f"output parameter classification must be a count of classes, got "
                                   f"{parameters.get('classification')!r}")
            if count and output.name != "logits":
                raise InvalidInput(f"output {output.name!r} takes no classification parameter: it applies to "
                                   "'logits'")
            if count:
                counts[output.name] = min(count, self.num_classes)
        return counts

    def _classification(self, logits: np.ndarray, count: int) -> np.ndarray:
        """Triton's answer to a classification request: "VALUE:INDEX:LABEL", the value as C++'s std::to_string."""
        order = np.argsort(-logits, axis=1, kind="stable")[:, :count]
        return np.array([[f"{float(row[i]):f}:{i}:{self.classifier.labels[i]}".encode() for i in best]
                         for row, best in zip(logits, order)], dtype=np.object_)

    async def _pixels(self, payload: InferRequest) -> np.ndarray:
        """The request's one input as a preprocessed float32 NCHW batch."""
        names = [i.name for i in payload.inputs]
        if len(names) != 1 or names[0] not in ("pixel_values", "image"):
            raise InvalidInput(f"expected one input, 'pixel_values' (FP32 [N,{self.channels},{self.height},"
                               f"{self.width}]) or 'image' (BYTES [N]), got {names}")
        tensor = payload.inputs[0]
        shape = list(tensor.shape)
        if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
            raise InvalidInput(f"input {tensor.name!r} has shape {shape}: every dimension must be a positive integer")
        if shape[0] > self.max_batch_size:
            raise InvalidInput(f"a batch of {shape[0]} is above the server's --max-batch-size {self.max_batch_size}")
        if tensor.name == "pixel_values":
            expected = [self.channels, self.height, self.width]
            if tensor.datatype != "FP32":
                raise InvalidInput(f"input 'pixel_values' must be FP32, got {tensor.datatype}")
            if len(shape) != 4 or shape[1:] != expected:
                raise InvalidInput(f"input 'pixel_values' must have shape [N,{','.join(map(str, expected))}], "
                                   f"got {shape}")
            try:
                pixels = tensor.as_numpy()
            except Exception as e:  # data that does not fill the declared shape
                raise InvalidInput(f"input 'pixel_values' data does not match its shape {shape}: {e}") from None
            if pixels.dtype != np.float32 or list(pixels.shape) != shape:
                raise InvalidInput(f"input 'pixel_values' data does not match its shape {shape}")
            if not np.isfinite(pixels).all():  # else NaN logits, and top_k would name classes for them
                raise InvalidInput(f"input 'pixel_values' holds {np.count_nonzero(~np.isfinite(pixels))} NaN or "
                                   "infinite values: preprocessed pixels are finite")
            return pixels
        if self.classifier.preprocess.image_mode is None:
            raise InvalidInput(f"this model takes {self.channels}-channel input and records no image mode to read "
                               f"images in: send 'pixel_values' (FP32 [N,{self.channels},{self.height},{self.width}])")
        if tensor.datatype != "BYTES" or len(shape) != 1:
            raise InvalidInput(f"input 'image' must be BYTES of shape [N] (one encoded image each), got "
                               f"{tensor.datatype} {shape}")
        try:  # binary data carries the files as they are; JSON strings carry them base64-encoded
            files = [base64.b64decode(b, validate=True) if isinstance(b, str) else bytes(b)
                     for b in tensor.as_numpy().ravel()]
        except Exception as e:
            raise InvalidInput(f"input 'image' data does not match its shape {shape}: {e}") from None
        if len(files) != shape[0]:
            raise InvalidInput(f"input 'image' holds {len(files)} elements for shape {shape}")
        return await asyncio.get_running_loop().run_in_executor(self.decoder, self._decode, files)

    def _decode(self, files: list[bytes]) -> np.ndarray:
        """The preprocessed batch, each image decoded once its predecessor is preprocessed: a request of large
        images holds one of them at a time, not a batch of them."""
        rows = []
        for i, data in enumerate(files):
            try:
                rows.append(self.classifier.preprocess(open_image(
                    io.BytesIO(data), name=f"input 'image' element {i}", formats=IMAGE_FORMATS,
                    max_pixels=self.max_image_pixels)))
            except UsageError as e:
                raise InvalidInput(str(e)) from None
        return np.stack(rows)

    def stop(self) -> None:
        self.batcher.close()
        self.decoder.shutdown(wait=False)
