"""Production inference: an Open Inference Protocol server (``server``, ``model``, ``batching``,
``metrics``) and Triton model repositories (``triton``). Nothing here imports torch."""
