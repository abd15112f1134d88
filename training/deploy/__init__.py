"""Deployable students (`clip-export`): open_clip release weights, ONNX (fp32 and int8) and
Hugging Face CLIPModel exports, each checked against the PyTorch model, plus a model card;
latency per backend for `clip-eval latency`. docs/deploy.md"""
