"""Incremental detokenization: the text built token by token is the full decode, for byte-level BPE
and SentencePiece (byte fallback) tokenizers; stop strings across token boundaries."""

import random
import re

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flexllm.worker.engine.detokenizer import IncrementalDetokenizer, find_stop
from flexllm.worker.engine.loader import resolve_model
from flexllm.worker.engine.sampling import SamplingParams

from ..conftest import small_vocab_tokenizer
from .conftest import make_engine

UNICODE_TEXTS = ["Hello 🙂🙂 world 👩‍👩‍👧 ok", "日本語のテキスト、中文字符和한국어", "naïve café — “quotes” ½ ∑ 𝔘𝔫𝔦",
                 " leading space and  two  spaces\nnew line\ttab", "🇫🇷🇩🇪 flags, 🎉 and emoji 😀 mixed with ascii"]


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style SentencePiece BPE: '▁' for spaces, <0xNN> byte fallback, a stripped leading space."""
    words = ["▁the", "▁a", "ing", "▁hello", "▁world", "er", "▁ok"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for ch in "▁abcdefghijklmnopqrstuvwxyzHW.,!":
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in words:
        for end in range(2, len(word) + 1):
            left, right = word[:end - 1], word[end - 1]
            if word[:end] not in vocab:
                merges.append((left, right))
                vocab[word[:end]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert tokenizer.decode(tokenizer.encode("hello the world 🙂")) == "hello the world 🙂"
    return tokenizer


@pytest.fixture(scope="module", params=["smollm2", "small-vocab-bpe", "sentencepiece"])
def tokenizer(request):
    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    return small_vocab_tokenizer() if request.param == "small-vocab-bpe" else sentencepiece_tokenizer()


def token_sequences(tokenizer, count: int = 25) -> list[list[int]]:
    """Random ids (special tokens and stray bytes included), unicode-heavy text, and both spliced.

    Not SentencePiece byte-fallback tokens at random: its decoder turns a whole run of <0xNN> tokens
    into one U+FFFD per token once the run is not valid UTF-8, so an invalid byte can still replace a
    character decoded (and streamed) before it -- text no incremental decoder can take back."""
    rng = random.Random(0)
    byte_fallback = {i for t, i in tokenizer.get_vocab().items() if re.fullmatch("<0x[0-9A-F]{2}>", t)}
    pool = [i for i in range(len(tokenizer)) if i not in byte_fallback]
    texts = [tokenizer.encode(t, add_special_tokens=False) for t in UNICODE_TEXTS]
    sequences = [rng.choices(pool, k=rng.randint(1, 60)) for _ in range(count)] + texts
    for _ in range(count):
        a, b = rng.sample(texts, 2)
        i, j = (rng.choice([0] + [k for k in range(1, len(t)) if not {t[k - 1], t[k]} & byte_fallback]) for t in (a, b))
        sequences.append(a[:i] + rng.choices(pool, k=2) + b[j:] + tokenizer.all_special_ids)
    return sequences


def test_incremental_text_is_the_full_decode(tokenizer):
    for ids in token_sequences(tokenizer):
        prompt = [5, 6, 7]
        tokens = prompt + ids
        detokenizer = IncrementalDetokenizer(tokenizer, len(prompt))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        for end in range(len(prompt) + 1, len(tokens) + 1):
            detokenizer.update(tokens, end, flush=end == len(tokens))
            assert full.startswith(detokenizer.text), (ids[:end - len(prompt)], detokenizer.text, full)
            assert end == len(tokens) or not detokenizer.text.endswith("\ufffd") or "\ufffd" in full
        assert detokenizer.text == full, ids


def test_stop_search_covers_matches_across_the_boundary():
    assert find_stop("abcdef", 4, ["cde"]) == 2  # began in checked text, ends in new text
    assert find_stop("abcdef", 4, ["ab", "ef"]) == 4  # "ab" lies wholly in checked text
    assert find_stop("abcdef", 0, ["x"]) is None and find_stop("abc", 1, []) is None
    assert find_stop("xxabab", 5, ["bab", "b"]) == 3  # the earliest start wins


def test_stop_strings_spanning_tokens_truncate_and_stream(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    greedy = SamplingParams(max_tokens=16, temperature=0)
    full = engine.generate([[50, 60, 70]], greedy)[0]
    pieces = [engine.tokenizer.decode(full.token_ids[:i]) for i in range(len(full.token_ids) + 1)]
    boundary = next(len(p) for p in pieces[3:] if 2 <= len(p) <= len(full.text) - 2)  # a token boundary
    stops = [full.text[boundary - 2:boundary + 2], "never in the text \u2603"]
    engine.add_request("s", [50, 60, 70], SamplingParams(max_tokens=16, temperature=0, stop=stops))
    deltas = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.delta_text)
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.find(stops[0])]
    assert "".join(deltas) == out.text
