"""``python -m onnx_pathwise``: the same command line as ``onnx-pathwise``."""

from .cli.shell import run

if __name__ == "__main__":
    run()
