"""Models: the only owner of timm, open_clip and huggingface_hub.

Teachers, students, the customizer and projectors, weights files and ONNX conversion.
"""
