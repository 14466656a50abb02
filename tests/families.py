"""Tiny random-init models of the popular small-model families, each with its family's real chat
template and special tokens (litgpt's way: a few layers, built in the test, nothing downloaded).

A family here is what a user brings: the architecture (with the features where tools break:
Llama 3 rope scaling, Qwen's q/k/v biases and Qwen3's q/k norms, Gemma's soft-capping, sliding
windows and (1 + w) norms, Phi-3's fused projections, SmolLM3's layers without rope) and the
tokenizer conventions (no pad token for Llama 3 and Mistral, templates without a system role,
thinking tags, the BOS token that Llama 3's, Gemma's and Mistral's tokenizers put before every
text). The tokenizer is a small byte-level BPE trained on ``CORPUS`` with the family's control
tokens added, so the templates render and tokenize as they do for the real models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from conftest import CHAT_TEMPLATE, CORPUS

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


@dataclass(frozen=True)
class Family:
    """One family: how to build its tiny model and tokenizer, and what its assistant turn looks like.

    ``answer_wrap``: the text the template writes around an assistant reply, as (before, after), where
    ``after`` is the end-of-turn marker a model must learn to emit (training targets are
    ``before + reply + after``; ``before`` is what the template adds inside the turn, e.g. Qwen3's
    empty thinking block).
    """

    name: str  # as users call it
    hf_class: str
    template: str  # file in tests/data/chat_templates, or "" for CHAT_TEMPLATE (ChatML)
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    answer_wrap: tuple[str, str]
    config: Callable[[int, dict[str, int]], Any]
    extra_tokens: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)
    notes: str = ""
    system_role: bool = True
    tags: dict[str, str] = field(default_factory=dict)

    def chat_template(self) -> str:
        return (TEMPLATES / self.template).read_text() if self.template else CHAT_TEMPLATE

    def tokenizer(self) -> PreTrainedTokenizerFast:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(self.specials),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS * 5, trainer)
        if self.extra_tokens:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in self.extra_tokens])
        if self.bos:  # the family's tokenizer puts its BOS before every text, as the real one does
            tok.post_processor = processors.TemplateProcessing(single=f"{self.bos} $A", pair=f"{self.bos} $A $B",
                                                               special_tokens=[(self.bos, tok.token_to_id(self.bos))])
        kw = {k: v for k, v in (("bos_token", self.bos), ("eos_token", self.eos), ("pad_token", self.pad)) if v}
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
        fast.chat_template = self.chat_template()
        return fast

    def model(self, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> torch.nn.Module:
        import transformers

        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        torch.manual_seed(seed)
        return getattr(transformers, self.hf_class)(self.config(len(tokenizer), ids)).eval()


def _llama3(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, **SHAPE, tie_word_embeddings=True, **ids,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64})


def _qwen2(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, **SHAPE, tie_word_embeddings=True, **ids)


def _qwen3(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, **SHAPE, head_dim=16, tie_word_embeddings=True, **ids)


def _gemma2(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(vocab_size=vocab, **SHAPE, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **ids)


def _gemma3(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Gemma3TextConfig

    shape = SHAPE | {"num_hidden_layers": 6}  # Gemma 3's pattern: five sliding-window layers, then a full one
    return Gemma3TextConfig(vocab_size=vocab, **shape, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **ids)


def _phi3(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(vocab_size=vocab, **SHAPE, tie_word_embeddings=False, **ids)


def _mistral(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab, **SHAPE, sliding_window=None, tie_word_embeddings=False, **ids)


def _smollm3(vocab: int, ids: dict[str, int]) -> Any:
    from transformers import SmolLM3Config

    return SmolLM3Config(vocab_size=vocab, **SHAPE, tie_word_embeddings=True, **ids)


CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GEMMA = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama3", "LlamaForCausalLM", "llama3_2.jinja",
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           "<|begin_of_text|>", "<|eot_id|>", None, ("", "<|eot_id|>"), _llama3,
           notes="llama3 rope scaling; no pad token; the template writes today's date"),
    Family("qwen2.5", "Qwen2ForCausalLM", "qwen2_5.jinja", CHATML, None, "<|im_end|>", "<|endoftext|>",
           ("", "<|im_end|>"), _qwen2, notes="q/k/v biases; a default system prompt"),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3.jinja", CHATML, None, "<|im_end|>", "<|endoftext|>",
           ("", "<|im_end|>"), _qwen3, extra_tokens=("<think>", "</think>"),
           notes="q/k norms; thinking tags in the template"),
    Family("gemma2", "Gemma2ForCausalLM", "gemma.jinja", GEMMA, "<bos>", "<eos>", "<pad>", ("", "<end_of_turn>"),
           _gemma2, system_role=False, notes="soft-capping, sliding window, (1 + w) norms; no system role"),
    Family("gemma3", "Gemma3ForCausalLM", "gemma3.jinja", GEMMA, "<bos>", "<eos>", "<pad>", ("", "<end_of_turn>"),
           _gemma3, notes="hybrid sliding/full attention, q/k norms; system folded into the user turn"),
    Family("phi3", "Phi3ForCausalLM", "phi3.jinja",
           ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), None, "<|endoftext|>",
           "<|endoftext|>", ("", "<|end|>"), _phi3, notes="fused qkv and gate_up projections"),
    Family("mistral", "MistralForCausalLM", "mistral.jinja", ("<unk>", "<s>", "</s>"), "<s>", "</s>", None,
           ("", "</s>"), _mistral, system_role=False, notes="no system role; no pad token"),
    Family("smollm3", "SmolLM3ForCausalLM", "", CHATML, None, "<|im_end|>", "<|endoftext|>", ("", "<|im_end|>"),
           _smollm3, notes="layers without rope (every 4th); ChatML stand-in template (SmolLM3's own is not stored here)"),
]}
