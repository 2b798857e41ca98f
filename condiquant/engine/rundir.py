"""The output folder of a run, shared by train.py (``experiments/<name>``) and test.py (``results/<name>``): an
existing folder is archived (unless the run resumes into it), the log opens with the environment, the command
and the resolved options. Callers validate their inputs before calling this, so bad input writes nothing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from condiquant.config import to_dict
from condiquant.runtime import archive, fresh_dir, setup_logger, timestamp


def open_run_dir(folder: Path, kind: str, name: str, options: Any, command: str, resume: bool = False,
                 tb_logger: bool = False) -> logging.Logger:
    """Prepare ``folder`` and return the run's logger; ``kind`` ("train"/"test") prefixes the log file name."""
    archived = None if resume else fresh_dir(folder)
    if tb_logger and not resume:  # the TensorBoard curves of the previous run go with its folder's archive
        archive(Path("tb_logger") / name)
    logger = setup_logger(folder / f"{kind}_{name}_{timestamp()}.log")
    if archived:
        logger.info("archived the previous %s as %s", folder, archived)
    if command:
        logger.info("command: %s", command)
    logger.info("resolved options:\n%s", yaml.safe_dump(to_dict(options), sort_keys=False))
    return logger
