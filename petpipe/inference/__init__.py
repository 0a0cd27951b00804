"""Using a trained model outside the pipeline: predict, the ONNX bundle (export with torch, run with numpy and
onnxruntime) and the MLflow model."""
