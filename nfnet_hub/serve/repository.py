"""The protocol's model repository extension, with the models fixed at start.

KServe's extension lets any client unload a model (``POST /v2/repository/models/NAME/unload``, gRPC's
``RepositoryModelUnload``), after which loading it back fails: one request would leave a live server that
answers 404 until restarted. ``nfnet-hub serve`` loads its models when it starts and keeps them, as Triton
does in its default model control mode (none), and says so to load and unload requests.
"""
from __future__ import annotations

from kserve.protocol.model_repository_extension import ModelRepositoryExtension


class ModelControlRefused(NotImplementedError):
    """Answered by KServe with HTTP 501, and over gRPC with UNIMPLEMENTED and ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FixedModels(ModelRepositoryExtension):
    async def load(self, model_name: str) -> None:
        raise ModelControlRefused(self._refusal("loaded", model_name))

    async def unload(self, model_name: str) -> None:
        raise ModelControlRefused(self._refusal("unloaded", model_name))

    @staticmethod
    def _refusal(verb: str, model_name: str) -> str:
        model = f"model {model_name!r}" if model_name else "a model"  # KServe's gRPC servicer passes no name
        return (f"{model} cannot be {verb}: nfnet-hub serve loads its models when it starts and keeps "
                "them (as Triton's model control mode none); restart it to serve others")
