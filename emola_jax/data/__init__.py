"""Inputs: images, the conversation template and tokenisation, FABA-Instruct records, landmark
features (ONNX -> ArrayRecord), datasets as tfds builders, and the grain input pipeline."""
