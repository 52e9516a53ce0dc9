"""Data stages: corpus -> tokenizer -> token stream cache -> train/validation carve.

`corpus` reads documents (UltraChat `messages` schema) and renders them; `tokenizer` trains
the byte-level BPE and encodes prompts and decodes ids; `cache` turns documents into one token
stream with document offsets and byte counts; `carve` cuts the stream's tail off as validation.
"""
