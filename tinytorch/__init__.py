"""The TinyTorch package: NumPy implementations built module by module in modules/."""

__version__ = "0.13.0"
