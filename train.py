"""Calibrate a quantized network (PTQ): ``python train.py -opt options/x4_2bit.yml``."""
from condiquant.cli import main_train

if __name__ == "__main__":
    raise SystemExit(main_train())
