"""A tiny, locally built text stack (word-level tokenizer + randomly initialised ``CLIPTextModel``).

Used to build small text-conditional diffusion models offline (tests, ``benchmarks/memorization_text_conditional.py``)
with the same component types as a Stable Diffusion pipeline: the tokenizer is a ``transformers`` fast tokenizer
(``PreTrainedTokenizerFast`` over a ``tokenizers`` ``WordLevel`` model) and the encoder a ``transformers``
``CLIPTextModel``, so both save and load with ``save_pretrained`` / ``from_pretrained`` and a diffusers pipeline
directory holding them loads with ``DiffusionPipeline.from_pretrained``. Nothing is downloaded.

Token layout follows CLIP: ``<|startoftext|> w_1 ... w_n <|endoftext|> <pad> ...`` padded to ``model_max_length``.
Words are lower-cased and split on whitespace and punctuation; words outside the vocabulary map to ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN)


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (ids 0-3 are BOS, EOS, PAD, UNK; then the words in first-seen order).

    Args:
        words: the vocabulary; duplicates are ignored, case is folded.
        model_max_length: the padded length, BOS and EOS included (CLIP: 77).
    """
    if not isinstance(model_max_length, int) or model_max_length < 3:
        raise ValueError(f"`model_max_length` must be an int >= 3 (BOS, a word, EOS), got {model_max_length!r}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if not isinstance(word, str) or not word.strip() or len(word.split()) != 1:
            raise ValueError(f"`words` must be single non-empty words, got {word!r}")
        word = word.lower()
        if word in vocab:
            continue
        if not word.isalnum():
            raise ValueError(f"`words` must be alphanumeric (punctuation is split off), got {word!r}")
        vocab[word] = len(vocab)
    if len(vocab) == len(SPECIAL_TOKENS):
        raise ValueError("`words` is empty")
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}", special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
    )


def build_tiny_clip_text_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    seed: int = 0,
) -> CLIPTextModel:
    """A randomly initialised ``CLIPTextModel`` (causal self-attention, as CLIP) sized for ``tokenizer``."""
    if hidden_size % num_attention_heads:
        raise ValueError(f"`hidden_size` {hidden_size} must be divisible by `num_attention_heads` {num_attention_heads}")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.eval()


def build_tiny_text_stack(
    words: Iterable[str], model_max_length: int = 16, hidden_size: int = 32, seed: int = 0, **encoder_kwargs
) -> tuple[PreTrainedTokenizerFast, CLIPTextModel]:
    """``(tokenizer, text_encoder)``: :func:`build_word_tokenizer` and :func:`build_tiny_clip_text_model`."""
    tokenizer = build_word_tokenizer(words, model_max_length)
    return tokenizer, build_tiny_clip_text_model(tokenizer, hidden_size=hidden_size, seed=seed, **encoder_kwargs)
