"""The secret scrubber: credentials go, metrics and spec fields about tokens of text stay."""

from __future__ import annotations

import dataclasses

import pytest

from tune_llama.loop import DATA_COUNTS, METRIC_NAMES
from tune_llama.redact import REDACTED, SECRET_NAME, scrub, secret_values
from tune_llama.spec import Spec

HF_LIKE = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bD1fH3"  # the shape of a Hugging Face access token


@pytest.mark.parametrize("name", ["token_budget", "tokens_per_s", "tokens_seen", "tokens_per_batch",
                                  "max_tokens_per_batch", "max_new_tokens", "loss_chunk_tokens", "tokenizer",
                                  "model.tokenizer", "data.max_tokens_per_batch", "token_count", "keys_seen"])
def test_names_about_tokens_of_text_are_not_credentials(name):
    assert not SECRET_NAME.search(name)


@pytest.mark.parametrize("name", ["hf_token", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "token", "wandb_api_key",
                                  "WANDB_API_KEY", "api_key", "apiKey", "password", "DB_PASSWORD", "secret",
                                  "client_secret", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "wandb.api_key",
                                  "private_key", "GOOGLE_APPLICATION_CREDENTIALS"])
def test_credential_names_are_recognised(name):
    assert SECRET_NAME.search(name)


def test_every_metric_a_trial_reports_and_every_spec_field_passes_the_scrubber():
    def names(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            yield prefix + key
            if isinstance(value, dict):
                yield from names(value, f"{prefix}{key}.")

    fields = list(names(dataclasses.asdict(Spec())))
    assert "data.max_tokens_per_batch" in fields
    assert [name for name in (*METRIC_NAMES, *DATA_COUNTS, *fields) if SECRET_NAME.search(name)] == []


def test_an_export_record_keeps_its_metrics_and_loses_its_credentials():
    info = {"metrics": {"token_budget": 4096, "tokens_per_s": 812.5, "tokens_seen": 120000,
                        "tokens_per_batch": 3900, "eval_loss": 1.2},
            "spec": {"data": {"max_tokens_per_batch": 4096}, "wandb": {"api_key": "0123456789abcdef"}},
            "env": {"HF_TOKEN": "anything-at-all", "password": "hunter22", "secret": "s3cr3t!"}}
    clean = scrub(info, secrets=[])
    assert clean["metrics"] == info["metrics"]
    assert clean["spec"]["data"] == {"max_tokens_per_batch": 4096}
    assert clean["spec"]["wandb"]["api_key"] == REDACTED
    assert clean["env"] == {"HF_TOKEN": REDACTED, "password": REDACTED, "secret": REDACTED}


def test_a_hugging_face_token_is_redacted_wherever_it_appears_even_unnamed():
    clean = scrub({"model": {"name": f"https://user:{HF_LIKE}@hub/llama"}, "argv": ["--set", f"x={HF_LIKE}"],
                   "note": HF_LIKE}, secrets=[])
    assert clean == {"model": {"name": f"https://user:{REDACTED}@hub/llama"}, "argv": ["--set", f"x={REDACTED}"],
                     "note": REDACTED}


def test_ordinary_names_that_start_with_hf_are_left_alone():
    text = "hf_internal_testing/tiny-random-llama hf_model checkpoint_000003"
    assert scrub(text, secrets=[]) == text


def test_values_of_credential_variables_are_secrets_and_of_metric_like_variables_are_not():
    environ = {"HF_TOKEN": "hf_shortish", "WANDB_API_KEY": "k" * 40, "TOKEN_BUDGET": "4096000",
               "TOKENIZERS_PARALLELISM": "false-ish"}
    assert secret_values(environ) == ["k" * 40, "hf_shortish"]
