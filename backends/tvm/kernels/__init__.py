"""Scheduled TVM PrimFuncs for the integer ops, one module per kernel family."""
