"""Data stages: corpus -> tokenizer -> token stream cache -> train/validation/test carve.

`corpus` reads documents (UltraChat `messages` schema), renders them and holds the held-out rule
(which documents are validation and test, by UTF-8 bytes); `tokenizer` trains the byte-level BPE
on the training documents, encodes prompts, decodes ids and gives each token's bytes; `cache`
turns documents into one token stream with document offsets and byte counts; `carve` cuts the
stream's tail off as validation and test at the same documents, and marks the scored predictions.
"""
