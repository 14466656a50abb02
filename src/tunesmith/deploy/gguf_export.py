"""GGUF export (llama.cpp's file format), its Ollama Modelfile, and a check that the file agrees.

``write_gguf`` writes a tuned causal LM the way llama.cpp's own ``convert_hf_to_gguf.py`` does for
its ``LlamaModel`` (and ``Qwen2Model``): tensor names from ``gguf.TensorNameMap``, the q/k rows of
Llama attention permuted from HF's rotate-half layout to llama.cpp's interleaved one, no
``output.weight`` when the embeddings are tied, 1-D tensors and norms kept in f32, and the
vocabulary as a gpt2-style byte-level BPE (``tokenizer.ggml.*``). When the base model came from a
GGUF file its tokenizer metadata is copied byte for byte instead, so llama.cpp tokenizes exactly as
it did for the base. The chat template written is the one the run trained with, and
``tokenizer.ggml.eos_token_id`` is its end-of-turn token, so llama.cpp stops where the assistant's
turn ends (``<|im_end|>`` for ChatML even when the tokenizer's eos is ``<|endoftext|>``).

``ollama_modelfile`` turns the HF chat template into an Ollama Go template by rendering probe
conversations and reading off each role's prefix and suffix; ``verify_gguf`` loads the file in
llama.cpp (``llama_cpp``, when installed; in a child process, see ``llama_consumer``) or
transformers' GGUF loader and compares greedy generations with the in-memory model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import torch

from tunesmith.data.formats import DataError
from tunesmith.data.render import TEMPLATE_DATE, ChatFormat, bos_ids, chat_format, fold_system, render
from tunesmith.deploy import llama_consumer
from tunesmith.deploy.errors import ExportError
from tunesmith.io import default_file_mode

Q = gguf.GGMLQuantizationType
DTYPES = {  # dtype -> (general.file_type, the type of 2-D weights)
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp's converter writes one HF model class (``convert_hf_to_gguf.py``'s ``*Model``).

    ``permute``: q/k rows go from HF's rotate-half layout to llama.cpp's interleaved one
    (``LlamaModel``; Qwen, Gemma and Phi-3 keep HF's). ``norm_shift``: added to every ``*norm.weight``
    (Gemma's RMSNorm scales by ``1 + w``, llama.cpp's by ``w``). ``swa_pattern``: llama.cpp builds
    these models with a fixed sliding/full layer pattern (every n-th layer full), so a config
    whose ``layer_types`` differ cannot be written.
    """

    arch: gguf.MODEL_ARCH
    permute: bool = False
    norm_shift: float = 0.0
    swa_pattern: int | None = None


# HF class -> how it is written, as convert_hf_to_gguf.py registers them: Mistral is written as
# "llama"; SmolLM3 is a Llama whose every 4th layer has no rope (llama.cpp's fixed step).
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, permute=True),
    "MistralForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, permute=True),
    "SmolLM3ForCausalLM": Architecture(gguf.MODEL_ARCH.SMOLLM3, permute=True),
    "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN3),
    "Phi3ForCausalLM": Architecture(gguf.MODEL_ARCH.PHI3),
    "Gemma2ForCausalLM": Architecture(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, swa_pattern=2),
    "Gemma3ForCausalLM": Architecture(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, swa_pattern=6),
}
# Classes whose GGUF llama.cpp does not read back as written, refused by name (none at present;
# tests/test_families.py records each in docs/support.md).
REFUSED: dict[str, str] = {}
# Byte-level BPE pre-tokenizers llama.cpp knows, by the HF pre-tokenizer's shape -> tokenizer.ggml.pre.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}
_EOS_KEY, _EOT_KEY = gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID


# ---------------------------------------------------------------------------------------- write


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: str | Path, dtype: str = "f16", name: str = "",
               source_gguf: str | Path | None = None) -> Path:
    """Write ``model`` (a plain HF causal LM, e.g. merged LoRA) and ``tokenizer`` as one GGUF file.

    ``dtype``: ``f32`` | ``f16`` | ``bf16`` | ``q8_0`` for 2-D weights; 1-D tensors and norms stay
    f32, and a q8_0 weight whose rows are not whole 32-value blocks falls back to f16 (as
    llama.cpp's converter does). ``name``: ``general.name`` (default: the model's folder name).
    ``source_gguf``: the GGUF file the base model was loaded from; its ``tokenizer.ggml.*``
    metadata is copied verbatim. The file is written to a temporary sibling and renamed over
    ``path``, so a failure never leaves a partial file. Returns ``path``. Raises ExportError for an
    unsupported architecture, dtype or tokenizer, or a source GGUF whose vocabulary does not fit.
    """
    path = Path(path)
    if dtype not in DTYPES:
        raise ExportError(f"GGUF dtype {dtype!r} is not supported; choose one of: {', '.join(DTYPES)}")
    arch = _architecture(model)
    fmt = _chat_format(tokenizer)
    config = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, default_file_mode())  # mkstemp makes 0600
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.arch])
    try:
        _add_hparams(writer, config, arch, _general_name(name or Path(str(config.name_or_path)).name or "model", arch, tokenizer),
                     DTYPES[dtype][0])
        _add_tensors(writer, model, arch, DTYPES[dtype][1])
        if source_gguf is not None:
            _copy_vocab(writer, Path(source_gguf), config.vocab_size, fmt)
        else:
            _add_hf_vocab(writer, tokenizer, config.vocab_size)
        _add_chat_metadata(writer, tokenizer, fmt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _general_name(name: str, arch: Architecture, tokenizer: Any) -> str:
    """``general.name``. llama.cpp reads it: a phi3 file named like Phi-3 ("phi3", "Phi-3-mini") is
    taken to carry Phi-3's SentencePiece tokens, and one whose vocabulary lacks ``<s>`` then fails
    to load ("error loading model vocabulary: unordered_map::at", seen with llama.cpp 0.3.36), so such
    a name loses the "3" there (a run named "phi3-sst2" is written as "phi-sst2")."""
    if arch.arch == gguf.MODEL_ARCH.PHI3 and "<s>" not in tokenizer.get_vocab():
        return re.sub(r"(?i)(phi)-?3", r"\1", name)
    return name


def _architecture(model: torch.nn.Module) -> Architecture:
    name = type(model).__name__
    if name in REFUSED:
        raise ExportError(f"cannot export {name} to GGUF: {REFUSED[name]}")
    if name not in ARCHITECTURES:
        raise ExportError(f"cannot export {name} to GGUF: supported architectures are {', '.join(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    config = model.config
    if arch.swa_pattern is not None:
        want = ["full_attention" if i % arch.swa_pattern == arch.swa_pattern - 1 else "sliding_attention"
                for i in range(config.num_hidden_layers)]
        if list(getattr(config, "layer_types", None) or want) != want:
            raise ExportError(f"cannot export {name} to GGUF: llama.cpp builds it with every {arch.swa_pattern}th layer "
                              f"full attention and the rest sliding-window, this model's layers are {config.layer_types}; "
                              "export --format hf (transformers, vLLM and tunesmith serve run it as it is)")
        head_dim = _head_dim(config)
        if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
            raise ExportError(f"cannot export {name} to GGUF: llama.cpp scales attention by 1/sqrt(head_dim = {head_dim}), "
                              f"this model by 1/sqrt(query_pre_attn_scalar = {config.query_pre_attn_scalar}); "
                              "export --format hf (transformers, vLLM and tunesmith serve run it as it is)")
    if name == "SmolLM3ForCausalLM":
        want = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
        if list(config.no_rope_layers) != want:
            raise ExportError(f"cannot export {name} to GGUF: llama.cpp leaves out rope on every 4th layer, "
                              f"this model's rope layers are {config.no_rope_layers}; "
                              "export --format hf (transformers, vLLM and tunesmith serve run it as it is)")
    return arch


def _chat_format(tokenizer: Any) -> ChatFormat:
    try:
        return chat_format(tokenizer)
    except DataError as e:
        raise ExportError(f"cannot export the chat format: {e}") from None


def _add_hparams(writer: gguf.GGUFWriter, config: Any, arch: Architecture, name: str,
                 file_type: gguf.LlamaFileType) -> None:
    """general.* and <arch>.* keys, as the converter's TextModel and per-model set_gguf_parameters
    write them (Gemma's soft-capping and sliding window, Phi-3's original context)."""
    rope = _rope(config)
    heads = config.num_attention_heads
    head_dim = _head_dim(config)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    rotary = int(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0) * head_dim)
    writer.add_rope_dimension_count(rotary)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)  # as the converter does for configs that state head_dim
    writer.add_value_length(head_dim)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3") and not (rope_type == "longrope" and arch.arch == gguf.MODEL_ARCH.PHI3):
        raise ExportError(f"rope scaling {rope_type!r} is not supported by this GGUF export "
                          "(supported: the default rope, linear, yarn, llama3, and Phi-3's longrope)")
    if arch.arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
    elif arch.arch == gguf.MODEL_ARCH.GEMMA3:
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ExportError("cannot export Gemma3ForCausalLM with attn_logit_softcapping: llama.cpp's gemma3 has none")
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {})
        if float(local.get("rope_theta", 10000.0)) != 10000.0:
            raise ExportError("cannot export Gemma3ForCausalLM: llama.cpp gives sliding-window layers a rope base of "
                              f"10000, this model {local['rope_theta']}")
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            writer.add_sliding_window(int(config.sliding_window))
    elif arch.arch == gguf.MODEL_ARCH.PHI3:
        original = rope.get("original_max_position_embeddings",
                            getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        if rope.get("long_factor"):
            scale = config.max_position_embeddings / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)


def _head_dim(config: Any) -> int:
    """Size of one attention head: the config's ``head_dim`` when it states one (Gemma, Qwen3), else
    hidden size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope(config: Any) -> dict[str, Any]:
    """The rope parameters of the full-attention layers (transformers 5: ``rope_parameters``, per
    layer type for Gemma 3)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return dict(rope.get("full_attention", rope))


def _extra_tensors(config: Any, arch: Architecture) -> dict[str, torch.Tensor]:
    """Tensors the converter generates: Llama 3's ``rope_freqs`` (LlamaModel.generate_extra_tensors,
    the frequency-dependent scaling of Meta's llama3 rope) and Phi-3's long/short rope factors."""
    rope = _rope(config)
    head_dim = _head_dim(config)
    names = gguf.TENSOR_NAMES
    if rope.get("rope_type") == "llama3":
        base = float(rope.get("rope_theta", 10000.0))
        freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
        old = rope.get("original_max_position_embeddings", 8192)
        factors = []
        for freq in freqs.tolist():
            wavelen = 2 * math.pi / freq
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return {names[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": torch.tensor(factors, dtype=torch.float32)}
    if arch.arch == gguf.MODEL_ARCH.PHI3 and rope.get("long_factor"):
        return {names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": torch.tensor(rope["long_factor"], dtype=torch.float32),
                names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": torch.tensor(rope["short_factor"], dtype=torch.float32)}
    return {}


def _add_tensors(writer: gguf.GGUFWriter, model: torch.nn.Module, arch: Architecture,
                 weight_type: gguf.GGMLQuantizationType) -> None:
    """Every parameter under its GGUF name; the tied output matrix is left out (llama.cpp reuses
    token_embd for it, and the converter never sees it since HF does not save it)."""
    config = model.config
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = _tied(model)
    output = next((f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    for gguf_name, data in _extra_tensors(config, arch).items():
        writer.add_tensor(gguf_name, data.numpy(), raw_dtype=Q.F32)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == output and tied:
            continue
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"tensor {hf_name} has no GGUF name for {gguf.MODEL_ARCH_NAMES[arch.arch]} "
                              "(a model change this export does not know)")
        kind, gguf_name = found
        data = tensor.detach().to("cpu", torch.float32)
        if arch.permute and kind == gguf.MODEL_TENSOR.ATTN_Q:
            data = permute_qk(data, heads, heads)
        elif arch.permute and kind == gguf.MODEL_TENSOR.ATTN_K:
            data = permute_qk(data, heads, kv_heads)
        if arch.norm_shift and hf_name.endswith("norm.weight"):
            data = data + arch.norm_shift
        array = data.numpy()
        qtype = tensor_type(gguf_name, array.shape, weight_type)
        writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _tied(model: torch.nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def permute_qk(weights: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs (``LlamaModel.permute``).

    ``weights``: (n_heads * head_dim, ...) rows of q_proj or k_proj (weight or bias); for k pass
    ``n_head_kv``. Within each head, row ``i`` of the first half and row ``i`` of the second half
    become rows ``2i`` and ``2i + 1``. Returns a tensor of the same shape.
    """
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute_qk(weights: torch.Tensor, n_head: int, n_head_kv: int) -> torch.Tensor:
    """The inverse of ``permute_qk`` (what transformers' GGUF loader applies)."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def tensor_type(gguf_name: str, shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The GGML type a tensor is stored in: f32 for 1-D tensors and norms (llama.cpp computes
    those in f32), f16 for a q8_0 weight whose rows are not whole blocks, else ``weight_type``.
    ``shape`` is numpy's (rows, row length)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[weight_type][0]
    if shape[-1] % block:
        return Q.F16
    return weight_type


# ---------------------------------------------------------------------------------------- vocab


def _copy_vocab(writer: gguf.GGUFWriter, source: Path, vocab_size: int, fmt: ChatFormat) -> None:
    """Copy the source file's ``tokenizer.ggml.*`` keys as raw bytes (eos/eot are set afterwards)."""
    if not source.is_file():
        raise ExportError(f"source GGUF not found: {source}")
    reader = gguf.GGUFReader(source)
    tokens = reader.fields.get(gguf.Keys.Tokenizer.LIST)
    if tokens is None:
        raise ExportError(f"{source} carries no tokenizer (no {gguf.Keys.Tokenizer.LIST})")
    if len(tokens.data) != vocab_size:
        raise ExportError(f"{source} has {len(tokens.data)} tokens but the model's vocabulary has {vocab_size} "
                          "(tokens added in training?): export without source_gguf")
    if fmt.end_of_turn_id is not None and tokens.contents(fmt.end_of_turn_id) != fmt.end_of_turn:
        raise ExportError(f"{source}: token {fmt.end_of_turn_id} is {tokens.contents(fmt.end_of_turn_id)!r}, "
                          f"not the tokenizer's end of turn {fmt.end_of_turn!r}: a different vocabulary")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in (_EOS_KEY, _EOT_KEY):
            _copy_field(writer, field)


def _copy_field(writer: gguf.GGUFWriter, field: Any) -> None:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == gguf.GGUFValueType.ARRAY:
            raise ExportError(f"cannot copy nested array {field.name}")
        values = ([bytes(field.parts[i]) for i in field.data] if sub == gguf.GGUFValueType.STRING
                  else [field.parts[i].tolist()[0] for i in field.data])
        writer.add_key_value(field.name, values, kind, sub_type=sub)
    elif kind == gguf.GGUFValueType.STRING:
        writer.add_key_value(field.name, bytes(field.parts[-1]), kind)
    else:
        writer.add_key_value(field.name, field.parts[-1].tolist()[0], kind)


def _add_hf_vocab(writer: gguf.GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """The vocabulary as ``_set_vocab_gpt2`` writes it: tokens by id, their types, merges, special ids."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = bpe_pre_tokenizer(backend)
    tokens, types = _vocab_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # gguf reads merges and special ids from the saved files
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.chat_template = None  # written by _add_chat_metadata, from the live tokenizer
    for kind in ("eos", "eot"):  # written by _add_chat_metadata: the end of turn
        special.special_token_ids.pop(kind, None)
        special.add_special_token.pop(kind, None)
    special.add_special_token.pop("bos", None)
    special.add_to_gguf(writer, quiet=True)
    probe = tokenizer("a").input_ids  # llama.cpp adds BOS/EOS only when told; say what HF does
    # the one reading of "adds a BOS" that training and the Modelfile (BOS left to Ollama) also use
    writer.add_add_bos_token(bool(bos_ids(tokenizer)))
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])


def bpe_pre_tokenizer(backend: dict[str, Any]) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a byte-level BPE tokenizer's pre-tokenizer.

    ``backend``: the tokenizer.json as a dict. Raises ExportError for a tokenizer that is not
    byte-level BPE (sentencepiece/llama-style), or whose text splitting llama.cpp would not reproduce.
    """
    model_type = backend.get("model", {}).get("type")
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if model_type != "BPE" or not any(s.get("type") == "ByteLevel" for s in steps):
        raise ExportError(f"the tokenizer is not a byte-level (GPT-2 style) BPE tokenizer (model {model_type}, "
                          f"pre-tokenizer {pre.get('type')}): a SentencePiece-style vocabulary (Gemma's, Llama 2's, "
                          "Mistral v0.1's, Phi-3-mini's) is written to GGUF only when the run's base model was itself a GGUF "
                          "(model: a .gguf file, default, gemma3-270m), whose vocabulary is copied. For this model "
                          "use --format hf and llama.cpp's convert_hf_to_gguf.py")
    shape = tuple(_step_key(s) for s in steps)
    if shape not in PRE_TOKENIZERS:
        raise ExportError(f"llama.cpp has no pre-tokenizer matching this tokenizer's ({json.dumps(pre)[:300]}); "
                          f"known: {', '.join(PRE_TOKENIZERS.values())}. Export from a GGUF base model (source_gguf)")
    return PRE_TOKENIZERS[shape]


def _step_key(step: dict[str, Any]) -> tuple[str, Any]:
    kind = step.get("type", "")
    if kind == "ByteLevel":
        return kind, bool(step.get("use_regex", True))
    if kind == "Digits":
        return kind, bool(step.get("individual_digits"))
    if kind == "Split":
        return kind, (step.get("pattern") or {}).get("Regex")
    return kind, json.dumps(step, sort_keys=True)


def _vocab_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their types, as ``get_vocab_base``: added special tokens are CONTROL, other
    added ones USER_DEFINED, ids the tokenizer lacks (an embedding padded past it) UNUSED."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _add_chat_metadata(writer: gguf.GGUFWriter, tokenizer: Any, fmt: ChatFormat) -> None:
    """The training chat template, and its end-of-turn token as eos and eot (llama.cpp stops on both)."""
    writer.add_chat_template(tokenizer.chat_template)
    stop = fmt.end_of_turn_id if fmt.end_of_turn_id is not None else tokenizer.eos_token_id
    if stop is None:
        raise ExportError("the tokenizer has neither an end-of-turn nor an end-of-sequence token: llama.cpp would not stop")
    writer.add_eos_token_id(stop)
    writer.add_eot_token_id(stop)


# ------------------------------------------------------------------------------------ Modelfile


_PROBES = {"system": "\x01SYSTEM-PROBE\x01", "user": "\x01USER-PROBE\x01", "assistant": "\x01ASSISTANT-PROBE\x01"}


@dataclass(frozen=True)
class RoleTemplate:
    """A chat template as text around each message: ``begin``, then for each message
    ``prefix[role] + content + suffix[role]``, with ``default_system`` first when the first message
    is not a system message, and ``generation`` after the last one when the model is to answer."""

    begin: str
    default_system: str
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str
    # the system message is written into the next user turn (content + blank line), as
    # ``data.render.fold_system`` does for templates without a system role (and Gemma 3's does itself)
    fold: bool = False
    trims: bool = False  # the template strips whitespace at the ends of each message (Llama 3, Gemma)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """What the HF template renders, when the template is expressible this way."""
        text = self.begin
        for i, m in enumerate(fold_system(messages) if self.fold else messages):
            if i == 0 and m["role"] != "system":
                text += self.default_system
            text += self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]]
        return text + (self.generation if add_generation_prompt else "")


def role_template(tokenizer: Any) -> RoleTemplate:
    """Read the chat template's per-role prefixes and suffixes off probe renderings, then check
    the result reproduces the template on several conversations. Raises ExportError when the
    template is not ``prefix + content + suffix`` per message (it rewrites content, depends on
    position beyond the first message, rejects system messages...)."""
    def render(messages: list[tuple[str, str]], gen: bool) -> str:
        convo = [{"role": r, "content": c} for r, c in messages]
        text = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=gen, date_string=TEMPLATE_DATE)
        # Phi-3's template closes a conversation that gets no generation prompt with its eos: never
        # part of a prompt Ollama sends (a user turn, then the generation prompt; or an open reply)
        return text[: len(text) - len(closing)] if closing and not gen and text.endswith(closing) else text

    closing = ""
    eos = tokenizer.eos_token or ""
    with contextlib.suppress(Exception):  # noqa: BLE001 - Jinja raises what it likes
        user_last = render([("user", _PROBES["user"])], False)
        if eos and user_last.endswith(eos) and not render([("user", _PROBES["user"])], True).endswith(eos):
            closing = eos  # a conversation ending with a user turn is closed by eos: not a turn's suffix

    s, u, a = (("system", _PROBES["system"]), ("user", _PROBES["user"]), ("assistant", _PROBES["assistant"]))
    try:
        trims = " \x01trim-probe\x01 " not in render([u, ("assistant", " \x01trim-probe\x01 ")], False)
    except Exception:  # noqa: BLE001
        trims = False
    try:
        return dataclasses.replace(_plain(tokenizer, render, s, u, a), trims=trims)
    except ExportError as plain_failed:
        try:  # no system role, or one folded into the first user turn: derive from user/assistant turns alone
            return dataclasses.replace(_folded(render, u, a), trims=trims)
        except ExportError:
            raise plain_failed from None


def _plain(tokenizer: Any, render: Any, s: tuple[str, str], u: tuple[str, str], a: tuple[str, str]) -> RoleTemplate:
    """Every role written as prefix + content + suffix, the system message in place."""
    try:
        try:
            begin = render([], False)
        except Exception:  # noqa: BLE001 - many templates index messages[0]; then there is no fixed beginning
            begin = ""
        full = render([s, u, a, u, a], False)
        with_gen = render([s, u], True)
        user_last = render([s, u], False)
        no_system = render([u], False)
    except Exception as e:  # noqa: BLE001 - Jinja raises what it likes ("System role not supported")
        raise ExportError(f"the chat template cannot be turned into an Ollama template: {e}") from None
    return _derive(begin, full, with_gen, user_last, no_system)


_NOT_ROLEWISE = ("the chat template is not a fixed prefix + content + suffix per role, so Ollama's "
                 "template language cannot reproduce it; write the Modelfile's TEMPLATE by hand")


def _segments(full: str, roles: tuple[str, ...], fail: ExportError) -> list[str]:
    """``full`` cut at each role's probe, in order: the text before each probe, then the rest.
    Raises ``fail`` when a probe is missing (the template dropped or rewrote that message)."""
    segments, rest = [], full
    for role in roles:
        head, sep, rest = rest.partition(_PROBES[role])
        if not sep:
            raise fail
        segments.append(head)
    return segments + [rest]


def _derive(begin: str, full: str, with_gen: str, user_last: str, no_system: str) -> RoleTemplate:
    """Solve for the pieces from the renderings (see ``role_template``)."""
    fail = ExportError(_NOT_ROLEWISE)
    segments = _segments(full, ("system", "user", "assistant", "user", "assistant"), fail)
    # segments: begin+pre_s | suf_s+pre_u | suf_u+pre_a | suf_a+pre_u | suf_u+pre_a | suf_a
    suf_a = segments[5]
    if not (segments[3].startswith(suf_a) and user_last.startswith(full[:full.index(_PROBES["user"])])):
        raise fail
    pre_u = segments[3][len(suf_a):]
    suf_u = user_last[user_last.index(_PROBES["user"]) + len(_PROBES["user"]):]
    if not (segments[1].endswith(pre_u) and segments[2].startswith(suf_u) and segments[0].startswith(begin)):
        raise fail
    suf_s = segments[1][: len(segments[1]) - len(pre_u)]
    pre_a = segments[2][len(suf_u):]
    pre_s = segments[0][len(begin):]
    if not with_gen.startswith(user_last) or pre_u + _PROBES["user"] not in no_system:
        raise fail
    default_system = no_system[len(begin): no_system.index(pre_u + _PROBES["user"])]
    if not no_system.startswith(begin):
        raise fail
    return RoleTemplate(begin, default_system, {"system": pre_s, "user": pre_u, "assistant": pre_a},
                        {"system": suf_s, "user": suf_u, "assistant": suf_a}, with_gen[len(user_last):])


def _folded(render: Any, u: tuple[str, str], a: tuple[str, str]) -> RoleTemplate:
    """The pieces of a template read off conversations without a system message; the system
    message is then folded into the first user turn (``RoleTemplate.fold``)."""
    fail = ExportError(_NOT_ROLEWISE)
    try:
        full, with_gen, user_last = render([u, a, u, a], False), render([u], True), render([u], False)
    except Exception as e:  # noqa: BLE001 - Jinja raises what it likes
        raise ExportError(f"the chat template cannot be turned into an Ollama template: {e}") from None
    segments = _segments(full, ("user", "assistant", "user", "assistant"), fail)
    # segments: begin+pre_u | suf_u+pre_a | suf_a+pre_u | suf_u+pre_a | suf_a
    suf_a = segments[4]
    if not segments[2].startswith(suf_a):
        raise fail
    pre_u = segments[2][len(suf_a):]
    suf_u = user_last[user_last.index(_PROBES["user"]) + len(_PROBES["user"]):]
    if not (segments[0].endswith(pre_u) and segments[1].startswith(suf_u) and segments[3] == segments[1]
            and with_gen.startswith(user_last)):
        raise fail
    begin, pre_a = segments[0][: len(segments[0]) - len(pre_u)], segments[1][len(suf_u):]
    return RoleTemplate(begin, "", {"system": "", "user": pre_u, "assistant": pre_a},
                        {"system": "", "user": suf_u, "assistant": suf_a}, with_gen[len(user_last):], fold=True)


def _without_leading(t: RoleTemplate, bos: str) -> RoleTemplate:
    """``t`` without the ``bos`` text it writes first: off ``begin``, or, when a template writes
    it with the first message (Llama 3.x: ``begin`` is empty), off the default system prompt and
    the system prefix (a system message comes first). Unchanged when it does neither."""
    if not bos:
        return t
    if t.begin.startswith(bos):
        return dataclasses.replace(t, begin=t.begin[len(bos):])
    if not t.begin and t.default_system.startswith(bos) and t.prefix["system"].startswith(bos):
        return dataclasses.replace(t, default_system=t.default_system[len(bos):],
                                   prefix=t.prefix | {"system": t.prefix["system"][len(bos):]})
    return t


def _check(tokenizer: Any, template: RoleTemplate, bos: str = "") -> None:
    """The derived pieces must reproduce the HF template on conversations they were not read from
    (less its leading ``bos`` text, which the GGUF's reader adds)."""
    words = ["Hi there", "Hello! How can I help?", "Tell me a joke.", "  spaced  \n", "Why?"]
    convos = [[("user", words[0])], [("system", words[2]), ("user", words[0])],
              [("user", words[0]), ("assistant", words[1]), ("user", words[3])],
              [("system", words[4]), ("user", words[0]), ("assistant", words[1]), ("user", words[2]),
               ("assistant", words[3]), ("user", words[4])]]
    for convo in convos:
        messages = [{"role": r, "content": c.strip() if template.trims else c} for r, c in convo]
        want = render(tokenizer, messages, add_generation_prompt=True)  # as training renders: folded, fixed date
        if bos and want.startswith(bos):
            want = want[len(bos):]
        if template.render(messages) != want:
            raise ExportError("the chat template is not a fixed prefix + content + suffix per role (it changes "
                              f"content or depends on position: {want[:120]!r}), so Ollama's template language "
                              "cannot reproduce it; write the Modelfile's TEMPLATE by hand")


def ollama_modelfile(tokenizer: Any, gguf_filename: str, system_prompt: str | None = None,
                     parameters: dict[str, Any] | None = None) -> str:
    """An Ollama Modelfile for ``gguf_filename`` (in the same folder) that formats chats exactly as
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` does.

    The TEMPLATE is Go template syntax over ``.Messages``; all literal text sits in string
    actions, so no whitespace trimming can eat a newline of the format. A final assistant message
    is left open (no suffix, no generation prompt): Ollama's convention for continuing a reply,
    the same text as ``continue_final_message=True``. ``system_prompt``: a SYSTEM line (Ollama
    sends it as the first message when a chat has none). ``parameters``: extra ``PARAMETER`` lines
    (a list value gives one line per item). Stops on the end-of-turn and end-of-sequence strings.
    Raises ExportError when the chat template cannot be written this way.
    """
    fmt = _chat_format(tokenizer)
    template = role_template(tokenizer)
    template = dataclasses.replace(template, generation=template.generation + fmt.reply_prefix)  # Qwen3's empty thinking
    # the GGUF says add_bos_token (written from the same tokenizer): Ollama puts the BOS first itself
    # and warns of a second one ("adding bos token to prompt which already has it"), so it leaves
    # the TEMPLATE, and the TEMPLATE must render the rest
    bos = tokenizer.bos_token if bos_ids(tokenizer) else ""
    template = _without_leading(template, bos)
    _check(tokenizer, template, bos)
    lines = [f"FROM ./{gguf_filename}", "", f'TEMPLATE """{go_template(template)}"""', ""]
    if bos:
        lines[1:1] = [f"# {bos} is not in the TEMPLATE: Ollama adds it before every prompt (the GGUF's add_bos_token)."]
    if template.trims:
        lines[1:1] = ["# The chat template strips whitespace at the ends of each message; this TEMPLATE sends messages",
                      "# as they are (the same text for any message that neither starts nor ends with whitespace)."]
    if system_prompt:
        if '"""' in system_prompt:
            raise ExportError('the system prompt contains """, which an Ollama Modelfile cannot quote')
        lines += [f'SYSTEM """{system_prompt}"""', ""]
    stops = dict.fromkeys(s for s in (fmt.end_of_turn, tokenizer.eos_token) if s)
    for stop in stops:
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    for key, value in (parameters or {}).items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(item, ensure_ascii=False) if isinstance(item, str) else item}")
    return "\n".join(lines) + "\n"


def _go(text: str) -> str:
    """``{{ "text" }}``: a Go string literal (JSON's escapes are Go's; non-ASCII stays raw so no
    surrogate pairs appear), or nothing for empty text."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def go_template(t: RoleTemplate) -> str:
    """The Ollama (Go text/template) TEMPLATE for ``t``. ``$last`` is Ollama's own idiom."""
    def content(role: str) -> str:  # a folded system message opens the next user turn
        held = '{{ if $system }}{{ $system }}{{ "\\n\\n" }}{{ $system = "" }}{{ end }}' if t.fold and role == "user" else ""
        return held + "{{ .Content }}"

    roles = "".join(
        (f'{{{{- {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
         + ("{{ $system = .Content }}" if t.fold and role == "system" else
            _go(t.prefix[role]) + content(role)
            + (f"{{{{ if not $last }}}}{_go(t.suffix[role])}{{{{ end }}}}" if role == "assistant" else _go(t.suffix[role]))))
        + "\n"
        for i, role in enumerate(("system", "user", "assistant")))
    text = (_go(t.begin) + "\n"
            + ('{{- $system := "" }}\n' if t.fold else "")
            + "{{- range $i, $_ := .Messages }}\n"
            + "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
            + (f'{{{{- if and (eq $i 0) (ne .Role "system") }}}}{_go(t.default_system)}{{{{ end }}}}\n'
               if t.default_system else "")
            + roles + "{{- end }}\n"
            + f'{{{{- if and $last (ne .Role "assistant") }}}}{_go(t.generation)}{{{{ end }}}}\n'
            + "{{- end }}")
    if '"""' in text:
        raise ExportError('the chat template contains """, which an Ollama Modelfile cannot quote')
    return text.lstrip("\n")


# ------------------------------------------------------------------------------------- verify


def verify_gguf(path: str | Path, model: torch.nn.Module, tokenizer: Any, prompts: list[str],
                max_new_tokens: int = 8) -> dict[str, Any]:
    """Load the GGUF in its consumer and compare greedy generations with ``model``'s.

    Each prompt is a user message, rendered with the chat template and the generation prompt (a
    prompt that already contains the template's special tokens is taken as rendered). Consumer:
    llama.cpp when its binding ``llama_cpp`` is installed, run in a child process (a crash in it
    is a failed verification, never the caller's crash; it stops on its own end-of-generation
    tokens, so this also checks that the end of turn stops it); else transformers' GGUF loader
    (stopping on the GGUF's eos), and ``note`` says that llama.cpp itself was not tried. Both
    sides generate up to ``max_new_tokens`` tokens greedily.
    Returns {consumer, prompts, agree_first_token, agree_all_tokens, stopped_at_end_of_turn,
    relative_diff, details: [{prompt, reference, consumer, prompt_ids_equal}]} (+ ``note``): token
    ids, and ``relative_diff`` the largest max|logit difference| / max|logit| at the first answer
    position over the prompts both sides tokenized alike (None if none did). When llama.cpp could
    not run the file: {consumer, prompts, error} with the way it failed (``ConsumerFailed``'s message).
    """
    fmt = _chat_format(tokenizer)
    texts = [p if any(s in p for s in fmt.specials) else tokenizer.apply_chat_template(
        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    note = None
    if llama_consumer.available():
        try:
            run = llama_consumer.run_llama_cpp(path, texts, max_new_tokens, max(map(len, encoded), default=0) + max_new_tokens + 16)
        except llama_consumer.ConsumerFailed as e:
            return {"consumer": "llama.cpp", "prompts": len(prompts), "error": str(e)}
        consumer_name = run.name
        answers = [(a.prompt_ids, a.new_ids, torch.from_numpy(a.first_logits)) for a in run.answers]
    else:
        consumer = _TransformersGGUF(Path(path))
        consumer_name = consumer.name
        note = ("llama.cpp's Python binding (llama_cpp) is not installed, so the file was read by transformers' "
                "GGUF loader instead: that checks the tensors and the vocabulary, not llama.cpp itself "
                "(install it with `make llama` or pip install 'tunesmith[llama]')")
        answers = [consumer.generate(text, max_new_tokens) for text in texts]
    details, diffs = [], []
    for prompt, ids, (consumer_ids, got, got_logits) in zip(prompts, encoded, answers):
        want, want_logits = greedy(model, ids, max_new_tokens, set(fmt.stop_ids))
        if consumer_ids == ids:
            diffs.append(float((want_logits - got_logits).abs().max() / want_logits.abs().max()))
        details.append({"prompt": prompt, "reference": want, "consumer": got, "prompt_ids_equal": consumer_ids == ids})
    eot = fmt.end_of_turn_id
    return {"consumer": consumer_name, "prompts": len(prompts),
            "agree_first_token": sum(d["reference"][:1] == d["consumer"][:1] for d in details),
            "agree_all_tokens": sum(d["reference"] == d["consumer"] for d in details),
            "stopped_at_end_of_turn": sum(bool(d["consumer"]) and d["consumer"][-1] == eot for d in details),
            "relative_diff": max(diffs) if diffs else None, "details": details} | ({"note": note} if note else {})


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int], max_new_tokens: int, stop: set[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation of ``ids`` with the KV cache, ending with the first stop token when one
    comes. Returns (the new ids, the (V,) fp32 logits that chose the first of them)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = DynamicCache()  # filled in place by each forward
    out: list[int] = []
    step, first = ids, None
    for _ in range(max_new_tokens):
        result = model(input_ids=torch.tensor([step], device=device), cache=cache, use_cache=True, logits_to_keep=1)
        logits = result.logits[0, -1].float().cpu()  # (V,)
        first = logits if first is None else first
        out.append(int(logits.argmax()))
        step = out[-1:]
        if out[-1] in stop:
            break
    return out, first if first is not None else torch.zeros(0)


class _TransformersGGUF:
    """transformers' GGUF loader as the consumer (when llama.cpp's binding is not installed)."""

    def __init__(self, path: Path):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(path.parent), path.name
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        self.name = f"transformers {transformers.__version__} GGUF loader"

    def generate(self, text: str, max_new_tokens: int) -> tuple[list[int], list[int], torch.Tensor]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return (ids, *greedy(self.model, ids, max_new_tokens, {self.tokenizer.eos_token_id}))
