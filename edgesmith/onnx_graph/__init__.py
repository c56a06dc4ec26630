"""Helpers that read or rewrite ONNX graphs and know nothing of passes: fp16 conversion
(:mod:`~edgesmith.onnx_graph.fp16`), ORT's transformer optimizer (:mod:`~edgesmith.onnx_graph.optimize`)."""
