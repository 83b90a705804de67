"""attnmap.tokens: target words marked in prompts, mapped to token indices through real tokenizers."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from attnmap.capture.tokens import find, parse_targets, resolve
from tiny_models import tokenizer


def wordpiece() -> Any:
    """A WordPiece tokenizer that splits 'flowers' into 'flow' '##ers' and adds [CLS] ... [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "flow", "##ers", "and"])
    }
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def test_parse_targets_strips_parentheses_and_keeps_order() -> None:
    assert parse_targets("A romantic (kiss) with (flowers)") == (
        "A romantic kiss with flowers",
        ["kiss", "flowers"],
    )
    assert parse_targets("a (red ball), a (dog) and a (dog)") == (
        "a red ball, a dog and a dog",
        ["red ball", "dog"],
    )
    assert parse_targets("no targets") == ("no targets", [])


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a () cat", "marks an empty target"),
        ("a ((cat)) here", "nested or unbalanced"),
        ("a (cat", "nested or unbalanced"),
    ],
)
def test_parse_targets_rejects_bad_marks(prompt: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_targets(prompt)


def test_find_maps_words_through_offsets() -> None:
    tok = tokenizer()
    prompt = "the (red) ball and the (dog) with a red ball"
    ids = tok(parse_targets(prompt)[0])["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    got = find(prompt, tok)
    assert got == {"red": [1, 8], "dog": [5]}  # a repeated word gives every occurrence
    assert [words[i] for i in got["red"]] == ["red", "red"]
    assert find("The RED ball", tok, ["red"]) == {"red": [1]}  # case is ignored
    assert find("a red ball", tok, ["</s>"]) == {"</s>": [3]}  # special tokens by name
    assert find("a red ball", tok, ["red ball"]) == {"red ball": [1, 2]}


def test_find_gathers_every_sub_token_of_a_split_word() -> None:
    tok = wordpiece()
    got = find("a (red) and (flowers)", tok)
    ids = tok("a red and flowers")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["[CLS]", "a", "red", "and", "flow", "##ers", "[SEP]"]
    assert got == {"red": [2], "flowers": [4, 5]}


def sentencepiece() -> Any:
    """A T5/UMT5-like Unigram tokenizer with Metaspace: offsets of '▁word' tokens include the space
    before the word, 'kiss' comes as '▁' 'kiss', 'flowers' as '▁flow' 'ers'; appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "▁a", "▁", "kiss", "▁flow", "ers", "▁romantic", "▁with", "▁Kiss"]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -2.0, -2.0, -1.0, -1.0, -1.0]
    tok = Tokenizer(models.Unigram(list(zip(pieces, scores)), unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def test_find_with_sentencepiece_offsets_skips_the_lone_space_piece() -> None:
    tok = sentencepiece()
    prompt = "a romantic (kiss) with (flowers) and a Kiss"
    got = find(prompt, tok)
    pieces = tok.convert_ids_to_tokens(tok(parse_targets(prompt)[0])["input_ids"])
    assert pieces[2:7] == ["▁", "kiss", "▁with", "▁flow", "ers"] and pieces[10] == "▁Kiss"
    assert got == {"kiss": [3, 10], "flowers": [5, 6]}  # not the lone '▁' (2); 'Kiss' matches by case


def test_find_without_offsets_matches_the_word_token_ids() -> None:
    class Slow:
        """A whitespace tokenizer without character offsets (like a slow tokenizer)."""

        vocab: ClassVar[dict[str, int]] = {"<s>": 0, "a": 1, "red": 2, "ball": 3}
        all_special_tokens: ClassVar[list[str]] = ["<s>"]

        def __call__(self, text: str, add_special_tokens: bool = True, **kwargs: Any) -> dict[str, list[int]]:
            if "return_offsets_mapping" in kwargs:
                raise NotImplementedError("no offsets")
            ids = [self.vocab[w] for w in text.split()]
            return {"input_ids": ([0] if add_special_tokens else []) + ids}

    assert find("a (red) ball", Slow()) == {"red": [2]}
    assert find("a red ball red", Slow(), ["red"]) == {"red": [2, 4]}


def test_find_errors_name_the_word() -> None:
    tok = tokenizer()
    with pytest.raises(ValueError, match="target word 'cat' is not in the prompt 'a red ball'"):
        find("a red ball", tok, ["cat"])
    with pytest.raises(ValueError, match="no target words"):
        find("a red ball", tok)
    with pytest.raises(ValueError, match="prompt must be a string"):
        find(None, tok)  # type: ignore[arg-type]


def test_resolve_accepts_index_mappings_and_needs_a_tokenizer_for_words() -> None:
    assert resolve({"red": [1], "ball": (3, 2)}, None, None) == (None, {"red": [1], "ball": [2, 3]})
    assert resolve(None, "a (red) ball", tokenizer()) == ("a red ball", {"red": [1]})
    assert resolve(None, "a red ball", None) == ("a red ball", {})
    with pytest.raises(ValueError, match="need prompt= and tokenizer="):
        resolve(["red"], "a red ball", None)
    with pytest.raises(ValueError, match=r"targets\['red'\] must be a non-empty list of token indices"):
        resolve({"red": [-1]}, None, None)
