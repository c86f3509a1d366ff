"""Keep secrets out of what tune-llama writes: W&B configs and histories, ``export.json``.

A secret is the value of an environment variable whose name looks like a
credential (``WANDB_API_KEY``, ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ...), or a
string shaped like a Hugging Face or GitHub token (``hf_...``, ``ghp_...``).
``scrub`` replaces such values wherever they occur inside strings, and the whole
value of any mapping key that looks like a credential. No third-party imports:
the export runs on machines without Ray or W&B.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

REDACTED = "<redacted>"
# The credential word must be the name's last part: HF_TOKEN, wandb.api_key and password match, while the
# metrics token_budget, tokens_per_s and max_tokens_per_batch (a token is also a unit of text) do not.
SECRET_NAME = re.compile(r"(?:^|[_.\-/])(?:(?:API|ACCESS|SECRET|PRIVATE)_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|"
                         r"CREDENTIALS?)$", re.IGNORECASE)
# Token formats with a fixed prefix (made so that scanners find them): caught even when no variable names them.
TOKEN_VALUE = re.compile(r"(?<![A-Za-z0-9])(?:hf|gh[pousr])_[A-Za-z0-9]{30,}")
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
        obj = TOKEN_VALUE.sub(REDACTED, obj)
    return obj
