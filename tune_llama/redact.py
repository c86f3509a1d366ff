"""Keep secrets out of what tune-llama writes: W&B configs and histories, ``export.json``.

A secret is the value of an environment variable whose name looks like a
credential (``WANDB_API_KEY``, ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...).
``scrub`` replaces such values wherever they occur inside strings, and the whole
value of any mapping key that looks like a credential. No third-party imports:
the export runs on machines without Ray or W&B.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

REDACTED = "<redacted>"
# Whole name parts only: HF_TOKEN and WANDB_API_KEY match, tokens_per_s and model.tokenizer do not.
SECRET_NAME = re.compile(r"(?:^|[_.\-])(?:API_?KEY|(?:ACCESS|AUTH)_?TOKEN|TOKEN|SECRET|PASSWORD|PASSWD|"
                         r"CREDENTIALS?|PRIVATE_?KEY|ACCESS_?KEY)(?:$|[_.\-])", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values ("1", "true") would blank out ordinary text


def secret_values(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Values of credential-like environment variables, longest first (so overlaps are fully replaced)."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if SECRET_NAME.search(k) and len(v.strip()) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def scrub(obj: Any, secrets: Optional[list[str]] = None) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings) with secrets replaced by ``<redacted>``."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, Mapping):
        return {k: REDACTED if isinstance(k, str) and SECRET_NAME.search(k) and obj[k] not in (None, "")
                else scrub(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub(v, secrets) for v in obj)
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
    return obj
