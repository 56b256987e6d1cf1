"""Helper modules the tests load as user code: model classes for --arch and a pass plugin."""
