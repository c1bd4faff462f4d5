"""qcompile: quantize Qwen checkpoints and compile them for llama.cpp (GGUF), ONNX Runtime and OpenVINO."""
__version__ = "0.1.0"
