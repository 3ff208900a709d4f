"""Exported models: each detector's inference as one graph (graphs), ONNX files checked
against the torch model and the ONNX Runtime inferencer (onnx)."""
