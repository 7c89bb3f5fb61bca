"""Build the tiny demo model offline: a random Llama with a byte-level BPE tokenizer.

Runs in the engine virtualenv (it needs torch, transformers and tokenizers). Everything is
derived from fixed seeds, so two builds give identical files. The model says nothing useful;
it exists so that a real vLLM server can load, schedule and stream it on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    "the",
    "a",
    "an",
    "model",
    "engine",
    "gateway",
    "request",
    "response",
    "token",
    "stream",
    "cluster",
    "launch",
    "ready",
    "idle",
    "stop",
    "priority",
    "cost",
    "minute",
    "hour",
    "GPU",
    "CPU",
    "server",
    "client",
    "queue",
    "wait",
    "load",
    "serve",
    "route",
    "proxy",
    "health",
    "hello",
    "world",
    "question",
    "answer",
    "chat",
    "completion",
    "embedding",
    "prompt",
    "user",
    "assistant",
    "system",
    "say",
    "tell",
    "why",
    "how",
    "what",
    "when",
    "where",
    "who",
    "which",
    "cold",
    "warm",
    "hot",
    "start",
    "time",
    "fast",
    "slow",
    "small",
    "large",
    "tiny",
    "llama",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "have",
    "has",
    "do",
    "does",
    "and",
    "or",
    "but",
    "if",
    "then",
    "else",
    "for",
    "with",
    "without",
    "of",
    "in",
    "on",
    "at",
    "by",
    "from",
    "to",
    "into",
    "over",
    "under",
    "again",
]


def corpus(lines: int) -> list[str]:
    """Deterministic pseudo-text: enough variety for 2048 BPE merges."""
    rng = random.Random(SEED)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "?", "!", ","]))
    return out


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(20000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))


def build_model(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head size 32: the CPU attention backend needs 32, 64 or >= 80
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    ).save_pretrained(str(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    args = parser.parse_args()
    out: Path = args.out
    # Build in a sibling temporary directory and rename: a half-built model is never left behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        build_tokenizer(tmp)
        build_model(tmp)
        (tmp / ".complete").write_text(json.dumps({"seed": SEED, "vocab_size": VOCAB_SIZE}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main()
