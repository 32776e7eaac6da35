"""Triton's binary tensor extension for BYTES inputs, which KServe 0.21 cannot take as they are.

KServe reads a binary request (``Inference-Header-Content-Length``) by converting every binary input
to JSON data; BYTES elements that are not UTF-8 text (an encoded image, always) fail there with HTTP
500, and a body shorter than its ``binary_data_size`` fails later, with another 500. This data plane
keeps each binary input as the bytes it arrived as (KServe's ``InferInput`` decodes them when asked)
and checks the sizes first: a wrong one is the protocol's 400. Its model metadata also names the one
version every model is served as (see ``metrics.InferenceGate``), where KServe says none.
"""
from __future__ import annotations

import orjson
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from .metrics import VERSION

HEADER = "inference-header-content-length"


class BinaryDataPlane(DataPlane):
    async def model_metadata(self, model_name: str) -> dict:
        return {**await super().model_metadata(model_name), "versions": [VERSION]}

    def decode_inference_request(self, body, headers, model_name):
        if not isinstance(body, bytes) or HEADER not in headers:
            return super().decode_inference_request(body, headers, model_name)
        length = headers[HEADER]
        if not length.isdigit() or int(length) > len(body):
            raise InvalidInput(f"{HEADER} {length!r} is not a length within the {len(body)}-byte body")
        try:
            request = orjson.loads(body[:int(length)])
            inputs, start = [], int(length)
            for spec in request["inputs"]:
                tensor = InferInput(spec["name"], spec["shape"], spec["datatype"], spec.get("parameters"))
                size = (spec.get("parameters") or {}).get("binary_data_size")
                if "data" in spec:
                    tensor.data = spec["data"]
                elif not isinstance(size, int) or size < 0 or start + size > len(body):
                    raise InvalidInput(f"input {spec['name']!r}: binary_data_size {size!r} does not fit the "
                                       f"{len(body) - start} bytes of binary data left in the body (truncated?)")
                else:
                    tensor._raw_data, start = body[start:start + size], start + size
                inputs.append(tensor)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise InvalidInput(f"not an inference request ({type(e).__name__}: {e})") from None
        if start != len(body):
            raise InvalidInput(f"{len(body) - start} bytes after the last input's binary data")
        outputs = [RequestedOutput(o["name"], o.get("parameters")) for o in request.get("outputs") or []]
        return InferRequest(model_name=model_name, request_id=request.get("id"), infer_inputs=inputs,
                            parameters=request.get("parameters"), request_outputs=outputs or None)
