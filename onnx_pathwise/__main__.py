"""``python -m onnx_pathwise``: the same command line as ``onnx-pathwise``."""

from .cli import main

if __name__ == "__main__":
    main()
