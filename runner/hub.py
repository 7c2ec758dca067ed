"""The data sets CODI's test.py evaluates, from the Hugging Face Hub or its cache (runner/data.py reads them).

Without network the load fails in one line, at once: huggingface_hub would retry an unreachable host
five times over ~25 s and log two lines per try, so an unreachable Hub is detected first and the
load then runs in offline mode (the cache only), as HF_HUB_OFFLINE=1 makes it.
"""
from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

from runner.errors import DatasetError

# CODI test.py's data sets: name -> (repository, config, splits concatenated in order, question field, answer field).
HUB = {"gsm8k": ("openai/gsm8k", "main", ("test",), "question", "answer"),
       "gsm-hard": ("juyoung-trl/gsm-hard", None, ("train",), "instruction", "response"),
       "svamp": ("ChilleD/SVAMP", None, ("train", "test"), "question_concat", "Answer"),
       "multi-arith": ("ChilleD/MultiArith", None, ("test",), "question", "final_ans")}


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (DNS, refused, no route), or None; a few seconds at most."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # reached through a proxy: a direct connection says nothing
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as error:
        return f"{url.hostname} is unreachable: {error.strerror or error}"
    return None


@contextlib.contextmanager
def _offline(datasets, reason: str | None):
    """Offline mode (HF_HUB_OFFLINE) for the duration, when `reason` says the Hub is unreachable."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if reason:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_hub(name: str):
    """A data set of CODI's test.py from the Hugging Face Hub (or its cache), its splits concatenated."""
    repository, config, splits, _, _ = HUB[name]
    unreachable = None
    try:
        import datasets
        from huggingface_hub.utils import logging as hub_logging

        unreachable = None if datasets.config.HF_HUB_OFFLINE else _hub_unreachable()
        verbosity = hub_logging.get_verbosity()
        hub_logging.set_verbosity_error()  # its retry warnings would add lines to the CLI's one-line error
        try:
            with _offline(datasets, unreachable):
                loaded = [datasets.load_dataset(repository, config, split=split) for split in splits]
        finally:
            hub_logging.set_verbosity(verbosity)
        return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)
    except Exception as error:  # offline, `datasets` raises anything from ConnectionError to ValueError
        reason = unreachable or (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = f"{repository} ({', '.join(filter(None, (config, *splits)))})"
        raise DatasetError(f"{name}: cannot load {where} from the Hugging Face Hub or its cache ({reason}); "
                           f"without network, pass a file instead, e.g. --dataset ../shared/data/gsm8k/test.jsonl "
                           f"(a file in {name}'s shape reads as {name} does)") from None
