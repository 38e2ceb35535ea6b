"""Kimi K2 text: the tiktoken tokenizer, special tokens and the K2 Thinking chat template.

Shared by training (chat data with assistant loss masks) and serving; pure Python, no JAX.
"""
