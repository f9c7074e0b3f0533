"""Triton kernels of the Triton backend, one module per kernel family.

- ``positives``: compact the positives (and check finiteness) in one pass; argsort them.
- ``streaming``: the two streaming passes over all N logits: bucket reduction (forward) and
  gradient distribution (backward), both with the same in-register binary search.
- ``tiles``: the O(P * bins) and O(P^2) terms, tiled in registers.

Importing this package imports triton. Whether the kernels run through the interpreter is
decided when they are defined: set ``TRITON_INTERPRET=1`` before importing them.
"""
