"""Composed students: timm vision towers, Hugging Face BERT and Lite-Transformer text towers,
linear / MLP / ConvFFN heads, and the `two-tower:` spec kind (docs/students.md).

    spec = training.specs.model_spec("two-tower:configs/students/Mobile-CLIP.json")

Modules: tokenizers (CLIP BPE, WordPiece), vision (timm), hf_text (BERT), lite_transformer
(long-short range attention), heads, model (the composed model), spec (the kind: build, export),
timm_init (a local timm file into an open_clip student's timm trunk, for model.student_init).
"""
