"""Tiny model builder and embedded Countdown data."""
import json
from fractions import Fraction

import torch

from rlt.data import countdown
from rlt.data.formats import resolve_format
from rlt.data.loading import load_examples
from rlt.testing.tiny_model import write_tiny_model


def test_tiny_model_is_deterministic_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b, c = (write_tiny_model(tmp_path / n, seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    ma, mb, mc = (AutoModelForCausalLM.from_pretrained(p) for p in (a, b, c))
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(v, w), k
    assert not torch.equal(ma.model.embed_tokens.weight, mc.model.embed_tokens.weight)
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|fim_pad|>"
    assert ma.config.hidden_size // ma.config.num_attention_heads == 64
    assert ma.config.num_hidden_layers == 2 and type(ma).__name__ == "Qwen2ForCausalLM"
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_countdown_solutions_are_correct():
    for r in countdown.generate_rows(30, seed=3):
        assert sorted(int(t) for t in r["answer"].replace("(", " ").replace(")", " ").split() if t.isdigit()) == sorted(r["numbers"])
        assert eval(r["answer"], {"__builtins__": {}}) == r["target"]  # noqa: S307 - our own expression
        assert r["reasoning_trace"].startswith("\n\n") and r["reasoning_trace"].endswith("\n\n")
        assert f"\\boxed{{{r['answer']}}}" in r["solution"]


def test_countdown_files_in_both_formats_parse_identically(tmp_path):
    paths = countdown.write_dataset(tmp_path, n=12, seed=5)
    s = load_examples(str(paths["stratos"]), resolve_format("bespoke_stratos"))
    c = load_examples(str(paths["custom"]), resolve_format("custom"))
    assert len(s) == len(c) == 12
    assert [(e.question, e.solution, e.thought) for e in s] == [(e.question, e.solution, e.thought) for e in c]
    first = json.loads(paths["stratos"].read_text().splitlines()[0])
    assert set(first) >= {"system", "conversations"}
