"""The held-out prompt sets of benchmarks/prompts/ parse, are big enough, and stay out of the draft's
training sources (no HumanEval prompt, no pydoc topic text, no Python file among the code sources)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common


@pytest.mark.parametrize("domain", sorted(common.HELD_OUT_DOMAINS))
def test_every_held_out_domain_has_enough_distinct_prompts(domain):
    texts = common.heldout_texts(domain, 1000)
    assert len(texts) >= 12 and len(set(texts)) == len(texts)
    assert all(text.strip() and "\ufffd" not in text for text in texts)
    assert common.heldout_texts(domain, 4) == texts[:4]


def test_code_in_other_languages_names_its_non_python_sources():
    path = common.HELD_OUT / common.HELD_OUT_DOMAINS["code_languages"][0]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]
    assert rows and all(row.get("source") for row in rows)
    assert not any(row["source"].split(":")[0].endswith(".py") for row in rows)


def test_an_unknown_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown held-out domain"):
        common.heldout_texts("poetry", 3)
