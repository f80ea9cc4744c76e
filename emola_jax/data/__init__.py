"""Inputs: images, the conversation template and tokenisation, FABA-Instruct records."""
