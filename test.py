"""Score a network (FP or quantized) on benchmarks: ``python test.py -opt options/test.yml``."""
from condiquant.cli import main_test

if __name__ == "__main__":
    raise SystemExit(main_test())
