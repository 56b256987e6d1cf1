"""Backends that lower an integer graph to code (tvm, onnx, reference); installed as
``qcompile.backends``."""
