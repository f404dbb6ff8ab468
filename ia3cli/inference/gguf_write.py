"""Hugging Face Llama-family weights as GGUF tensors and metadata, on llama.cpp's own ``gguf`` package.

- **Names.** ``gguf.get_tensor_name_map`` maps ``model.layers.3.self_attn.k_proj.weight`` to ``blk.3.attn_k.weight``.
- **Row order.** llama.cpp's ``llama`` architecture rotates adjacent pairs of each head's dimensions, Hugging Face
  rotates its two halves, so the rows of Q and K are interleaved per head on the way into the file (and
  transformers' GGUF loader undoes it on the way out). Anything that scales those rows, such as an IA3 vector on
  ``k_proj``, must be reordered the same way. ``qwen2`` keeps the Hugging Face order (NEOX rotary).
- **Types.** 2-D weights get the requested type when their rows fill whole quantisation blocks, else f16; 1-D
  tensors (norms, biases) stay f32, as llama.cpp's converter does.
- **Metadata and vocabulary.** The keys llama.cpp and transformers read, and the vocabulary from the tokenizer's
  ``tokenizer.json`` through ``gguf.vocab`` (byte-level BPE, or the byte-fallback BPE of Llama 2 and Mistral).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ia3cli.errors import Ia3Error

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter
    from transformers import PretrainedConfig

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # Hugging Face model_type -> GGUF architecture
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_1", "q4_0")  # what --type accepts (the gguf package quantises these)
PERMUTED = {"llama"}  # architectures whose Q and K rows llama.cpp interleaves for its rotary embedding


def qtype(name: str) -> GGMLQuantizationType:
    """The ``GGMLQuantizationType`` called ``name`` (``q8_0`` -> ``Q8_0``)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def gguf_arch(config: PretrainedConfig) -> str:
    """The GGUF architecture a Hugging Face config is written as.

    Raises:
        Ia3Error: for a family the export does not cover, listing those it does.
    """
    model_type = str(getattr(config, "model_type", ""))
    if model_type not in ARCHS:
        raise Ia3Error(
            f"cannot export a '{model_type}' model to GGUF: supported families are {', '.join(ARCHS)} (causal-lm)",
            "use `ia3 merge` for a plain transformers checkpoint instead",
        )
    return ARCHS[model_type]


def gguf_names(hf_names: list[str], arch: str, n_layers: int) -> dict[str, str]:
    """Map each Hugging Face parameter name that has a GGUF counterpart to that GGUF tensor name."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch_id = next(key for key, value in MODEL_ARCH_NAMES.items() if value == arch)
    table = get_tensor_name_map(arch_id, n_layers)
    names = {}
    for hf_name in hf_names:
        found = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            names[hf_name] = found
    return names


def to_file_order(name: str, array: np.ndarray, arch: str, config: PretrainedConfig) -> np.ndarray:
    """Reorder the rows of ``array`` (a weight, bias or per-row vector of GGUF tensor ``name``) as the file keeps
    them: for the ``llama`` architecture, each head's Q/K rows ``[first half | second half]`` become interleaved
    pairs (row ``i`` of the first half next to row ``i`` of the second), which is the pairing llama.cpp's rotary
    embedding expects. Everything else is returned as it is.
    """
    if arch not in PERMUTED or not (".attn_q." in name or ".attn_k." in name):
        return array
    heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
    halves = array.reshape(heads, 2, array.shape[0] // heads // 2, *array.shape[1:])
    return halves.swapaxes(1, 2).reshape(array.shape)


def encode(array: np.ndarray, type_name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """``array`` (float32) stored as ``type_name``; 1-D tensors stay f32, rows that do not fill whole blocks f16."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quantize

    target = qtype(type_name)
    if array.ndim < 2:
        target = GGMLQuantizationType.F32
    elif array.shape[-1] % GGML_QUANT_SIZES[target][0] != 0:
        target = GGMLQuantizationType.F16
    return quantize(np.ascontiguousarray(array, dtype=np.float32), target), target


def write_metadata(writer: GGUFWriter, config: PretrainedConfig, arch: str, type_name: str, name: str) -> None:
    """The architecture keys llama.cpp and transformers read for a Llama-family model.

    Raises:
        Ia3Error: for rotary scaling other than the default (llama.cpp needs extra tensors for it).
    """
    from gguf import LlamaFileType

    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise Ia3Error(
            f"rotary scaling '{rope['rope_type']}' ({config.model_type}) is not supported by `ia3 export` yet",
            "use `ia3 merge`, then llama.cpp's converter on the merged model",
        )
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // config.num_attention_heads or arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
    writer.add_file_type(LlamaFileType[file_types.get(type_name, f"MOSTLY_{type_name.upper()}")])


def write_vocab(writer: GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> str:
    """The tokenizer saved in ``tokenizer_dir`` (``tokenizer.json``) as GGUF tokens, types, merges and special ids.

    Tokens the tokenizer marks special become CONTROL tokens, other added tokens USER_DEFINED; the list is padded
    to the model's ``vocab_size`` with unused ``[PADn]`` tokens, as llama.cpp's converter does.

    Returns:
        The pre-tokenizer name written (``tokenizer.ggml.pre``).

    Raises:
        Ia3Error: for a tokenizer that is neither byte-level BPE nor byte-fallback BPE, or larger than the model.
    """
    from gguf import TokenType
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    vocab = None
    for kind in (BpeVocab, LlamaHfVocab):
        try:
            vocab = kind(tokenizer_dir)
            break
        except (FileNotFoundError, TypeError, ValueError):
            continue
    if vocab is None:
        raise Ia3Error(
            f"{tokenizer_dir}: the tokenizer is neither byte-level BPE nor Llama's byte-fallback BPE "
            "(tokenizer.json), the two kinds the GGUF export writes",
            "use `ia3 merge` for a plain transformers checkpoint instead",
        )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise Ia3Error(f"{tokenizer_dir}: the tokenizer has {len(tokens)} tokens, the model only {vocab_size}")
    raw = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for added in raw.get("added_tokens", []):
        if added["id"] < len(types):
            types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    pre = pre_tokenizer_name(raw.get("pre_tokenizer")) if vocab.tokenizer_model == "gpt2" else "default"
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if vocab.tokenizer_model == "llama":
        writer.add_token_scores(scores)
    SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(
        writer, quiet=True
    )
    return pre


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """The ``tokenizer.ggml.pre`` name of a byte-level tokenizer's pre-tokenizer: the named split patterns
    transformers' GGUF loader knows (llama-bpe, qwen2, ...), plain GPT-2 byte-level, or SmolLM's digits + byte-level;
    ``default`` otherwise (llama.cpp then splits as GPT-2 does and warns)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [step.get("type") for step in steps]
    for step in steps:
        pattern = (step.get("pattern") or {}).get("Regex") if step.get("type") == "Split" else None
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if pattern == split:
                return name
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    return "default"


def write_hf(
    path: Path,
    tensors: dict[str, np.ndarray],
    config: PretrainedConfig,
    tokenizer_dir: Path,
    type_name: str,
    name: str,
) -> dict[str, int]:
    """Write a whole Hugging Face Llama-family causal LM (``tensors``: its float32 state dict) as one GGUF file.

    Returns:
        How many tensors were stored in each GGUF type, e.g. ``{"Q8_0": 15, "F32": 9}``.

    Raises:
        Ia3Error: for an unsupported family, rotary scaling or tokenizer, or a weight with no GGUF name.
    """
    from gguf import GGUFWriter

    arch = gguf_arch(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = [n for n in tensors if not (tied and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq")]
    names = gguf_names(wanted, arch, config.num_hidden_layers)
    missing = [n for n in wanted if n not in names]
    if missing:
        raise Ia3Error(f"no GGUF tensor name for {', '.join(missing[:3])} ({config.model_type})")
    writer = GGUFWriter(str(path), arch)
    write_metadata(writer, config, arch, type_name, name)
    write_vocab(writer, tokenizer_dir, config.vocab_size)
    counts: dict[str, int] = {}
    for hf_name in wanted:
        gguf_name = names[hf_name]
        data, stored = encode(to_file_order(gguf_name, tensors[hf_name], arch, config), type_name)
        writer.add_tensor(gguf_name, data, raw_dtype=stored)
        counts[stored.name] = counts.get(stored.name, 0) + 1
    _finish(writer)
    return counts


def _finish(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
