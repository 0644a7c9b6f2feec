"""A real tokenizer with a chat template for a tiny zoo model, trained locally on generated text (no downloads).

`add_chat_tokenizer(model_dir)` trains a byte-level BPE with the `tokenizers` package on a seeded generated
corpus, with the zoo's special ids (<pad> 0, <s> 1, </s> 2) and ChatML turn markers, and writes
tokenizer.json + tokenizer_config.json (with a chat template) beside the model, so that
`transformers.AutoTokenizer.from_pretrained(model_dir)` loads it like any checkpoint's tokenizer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4, in this order
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = ("the a review diff code function test change line file bug fix patch reviewer agent tool call "
          "thread branch fork cache prefix token model engine snapshot restore summary security style "
          "performance correctness please check this and that with for of to in on is are was be "
          "system user assistant answer question plan step result final").split()


def corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    """Seeded sentences over a small vocabulary, with digits and punctuation."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randrange(4, 16))]
        if rng.random() < 0.3:
            words.append(str(rng.randrange(1000)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]))
    return lines


def add_chat_tokenizer(model_dir: Path, vocab_size: int) -> Path:
    """Write the tokenizer beside the model (once); its vocabulary fits within `vocab_size` ids."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.json").is_file() and (model_dir / "tokenizer_config.json").is_file():
        return model_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    assert tokenizer.get_vocab_size() <= vocab_size and tokenizer.token_to_id("</s>") == 2
    tmp = model_dir / ".tokenizer.json.tmp"
    tokenizer.save(str(tmp))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tmp.rename(model_dir / "tokenizer.json")  # last: its presence means the pair is complete
    return model_dir
